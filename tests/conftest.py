import os
import tempfile

import numpy as np
import pytest
import torch

from medexplore.data.medmnist import MEDMNIST
from medexplore.data.sample import Sample
from medexplore.models import Batch, Domain, DomainVocab, TaskSpec, create_model

# the embedded dataset is generated once per test session, outside the user's cache
os.environ.setdefault("MEDEXPLORE_CACHE", tempfile.mkdtemp(prefix="medexplore-cache-"))

ALL_KIND_TASKS = [
    TaskSpec("presence", "binary", 1),
    TaskSpec("organ", "multiclass", 4),
    TaskSpec("findings", "multilabel", 3),
    TaskSpec("grade", "ordinal", 5),
    TaskSpec("size", "regression", 2),
    TaskSpec("tissue", "segmentation", 3),
    TaskSpec("lesions", "detection", 3),
]
VOCAB = DomainVocab(modalities=("xray", "mri", "ct"), body_parts=("chest", "brain", "abdomen"))


def small_model(tasks=ALL_KIND_TASKS, **overrides):
    torch.manual_seed(0)
    options = dict(embed_dim=48, depth=2, num_heads=3, patch_size=4, vocab=VOCAB)
    options.update(overrides)
    return create_model("medformer_tiny", tasks=tasks, **options).eval()


def image(dims: int, size: int = 16, channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, *([size] * dims), generator=g)


def full_labels(dims: int, size: int, seed: int = 0) -> dict:
    """One label of every task for one image of the given dimensionality."""
    g = torch.Generator().manual_seed(seed)
    box = torch.tensor([[1.0] * dims + [size / 2] * dims])
    return {
        "presence": int(torch.randint(0, 2, (), generator=g)),
        "organ": int(torch.randint(0, 4, (), generator=g)),
        "findings": torch.randint(0, 2, (3,), generator=g).float(),
        "grade": int(torch.randint(0, 5, (), generator=g)),
        "size": torch.rand(2, generator=g),
        "tissue": torch.randint(0, 3, (size,) * dims, generator=g),
        "lesions": box,
    }


@pytest.fixture
def model():
    return small_model()


@pytest.fixture
def mixed_batch():
    """2D grey, 2D RGB, 3D, another 2D grey, and an odd-sized 3D, each with every label."""
    specs = [(2, 16, 1, Domain("2d", "xray", "chest")), (2, 16, 3, Domain("2d", "fundus", "eye")),
             (3, 16, 1, Domain("3d", "mri", "brain")), (2, 16, 1, Domain("2d", "xray", "chest")),
             (3, 8, 1, Domain("3d", "ct", "abdomen"))]
    images, domains, labels = [], [], []
    for i, (dims, size, ch, dom) in enumerate(specs):
        images.append(image(dims, size, ch, seed=i))
        domains.append(dom)
        labels.append(full_labels(dims, size, seed=i))
    targets = {name: [lab[name] for lab in labels] for name in labels[0]}
    return Batch.from_images(images, domains, targets)


# ---------------------------------------------------------------------------- a model with a known answer
REGION_DOMAIN = Domain("2d", "xray", "chest")
REGION = (slice(4, 12), slice(20, 28))  # the only place the label can be read


def _region_images(n, g):
    x = torch.randn(n, 1, 32, 32, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(16, 24, (2,), generator=g))
        x[i, 0, r:r + 8, c - 16:c - 8] += 1.5  # a distractor of the same look, elsewhere
        if y[i]:
            x[i, 0, REGION[0], REGION[1]] += 1.5
    return x, y


@pytest.fixture(scope="session")
def region_model():
    """A tiny model trained until the bright square in REGION (and only there) decides its output."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = create_model("medformer_tiny", tasks=[TaskSpec("target", "binary", 1)], embed_dim=32, depth=2,
                         num_heads=2, patch_size=4, output_adaptformer=False)
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(120):
        x, y = _region_images(32, g)
        batch = Batch.from_images(x, REGION_DOMAIN, {"target": y.tolist()})
        loss, _ = model.compute_loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = _region_images(64, g)
    model.eval()
    with torch.no_grad():
        accuracy = ((model(Batch.from_images(x, REGION_DOMAIN)).predictions["target"] > 0).long() == y).float().mean()
    assert accuracy > 0.95
    positives = [Sample(x[i], REGION_DOMAIN) for i in torch.nonzero(y)[:3, 0].tolist()]
    return model, positives


# ---------------------------------------------------------------------------- files in the MedMNIST layout
def write_npz(path, flag, n=(12, 6, 6), seed=0):
    """A small file in the medmnist layout for ``flag`` (labels correlate with brightness)."""
    info = MEDMNIST[flag]
    g = np.random.default_rng(seed)
    shape = (28,) * info.dims + ((3,) if info.dims == 2 and info.channels == 3 else ())
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        if info.kind == "multilabel":
            labels = g.integers(0, 2, (count, len(info.labels)))
        else:
            labels = g.integers(0, len(info.labels), (count, 1))
        images = (g.random((count, *shape)) * 100 + labels[:, :1].reshape(-1, *[1] * len(shape)) * 100).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.uint8)
    np.savez(path, **arrays)
    return path
