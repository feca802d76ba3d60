import os
import tempfile

import pytest
import torch

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
