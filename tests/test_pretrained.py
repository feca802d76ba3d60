"""Models shipped with medexplore: each loads with the current code, runs, matches its card, and a name
works wherever a checkpoint folder does."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medexplore.analysis.inference import infer_image
from medexplore.models import Batch
from medexplore.models.kinds import kind_entry
from medexplore.models.tasks import Domain
from medexplore.pretrained import pretrained_folder, pretrained_models
from medexplore.train.checkpoint import (
    CheckpointError,
    export_checkpoint,
    init_from_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from medexplore.train.weights import load_backbone_weights

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
SHIPPED = sorted(pretrained_models())
SHIPPED_MULTITASK = "medformer-medmnist-embedded-v2"
CARD_SECTIONS = ("## Data", "## Recipe and the command that reproduces it", "## Test metrics", "## Known failure cases")


def test_at_least_one_model_ships():
    assert "medformer-medmnist5-v1" in SHIPPED


def test_models_are_listed_by_name_with_the_newest_version_of_each_first():
    from medexplore.pretrained import _newest_first

    names = ["b", "a-vicreg-v1", "a-v2", "a-v10"]
    assert [p.name for p in sorted(map(Path, names), key=_newest_first)] == ["a-v10", "a-v2", "a-vicreg-v1", "b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_with_this_code_and_runs(name):
    model, meta = load_model(name)  # a name, not a path
    shipped = pretrained_models()[name]
    assert shipped.size_bytes <= 15e6
    assert not (shipped.folder / "train_state.pt").exists()
    assert meta["data"].get("root") is None and meta["data"].get("path") is None  # no machine paths shipped
    model.eval()
    if not model.tasks:  # a backbone (e.g. a GMoE's general expert): embeddings of 2D and 3D images
        images = [torch.rand(3, 28, 28), torch.rand(1, 28, 28, 28)]
        with torch.no_grad():
            embedding = model(Batch.from_images(images, [Domain("2d"), Domain("3d")])).embedding
        assert embedding.shape == (2, model.config.embed_dim) and torch.isfinite(embedding).all()
    for dims in {d for spec in model.tasks.values() for d in spec.dimensionalities}:
        side = 28
        image = torch.rand((1,) + (side,) * int(dims[0]), generator=torch.Generator().manual_seed(0))
        domain = Domain(dims, "unknown", "unknown")
        found = infer_image(model, image, domain)
        applies = [n for n, s in model.tasks.items() if s.applies_to(domain)]
        outputs = {n: kind_entry(model.tasks[n].kind).output for n in applies}
        assert set(found.scores) == {n for n in applies if outputs[n] == "vector"}
        assert set(found.segmentations) == {n for n in applies if outputs[n] == "mask"}
        assert all(mask.shape == image.shape[1:] for mask in found.segmentations.values())
        assert all(np.isfinite(v).all() for v in found.scores.values())
        probabilities = [v for n, v in found.scores.items() if model.tasks[n].kind != "regression"]  # a count is not
        assert all((v >= 0).all() and (v <= 1).all() for v in probabilities)


@pytest.mark.parametrize("name", SHIPPED)
def test_card_has_every_section_and_the_recorded_test_metrics(name):
    shipped = pretrained_models()[name]
    card = shipped.card.read_text()
    for section in CARD_SECTIONS:
        assert section in card, f"{shipped.card}: no {section!r} section"
    assert "licence" in card.lower() and ("medexplore train" in card or "medexplore pretrain" in card)
    meta = json.loads((shipped.folder / "meta.json").read_text())
    kinds = {task["name"]: task["kind"] for task in meta["model"]["tasks"]}
    for task, metrics in meta["shipped"]["test_metrics"].items():
        row = re.search(rf"^\| {task} \| ([0-9.]+) \| ([0-9.]+|-) \|", card, re.M)
        assert row, f"{shipped.card}: no test row for {task}"
        if "auc" in metrics:  # classification: AUC and ACC
            assert (float(row[1]), float(row[2])) == (round(metrics["auc"], 3), round(metrics["acc"], 3))
        else:  # the kind's headline metric (Dice, mAP@0.5, MAE)
            assert float(row[1]) == round(metrics[kind_entry(kinds[task]).headline], 3)


def test_fine_tuning_on_other_data_keeps_each_modality_and_body_part_its_own_latents():
    """A run on part of the data (its vocabulary in another order, shorter) gets every value's own latents
    from --init, and a value the checkpoint lacks starts from its unknown row; the image features match."""
    from medexplore.models import DomainVocab

    model, _ = load_model(SHIPPED_MULTITASK)
    old = model.config.vocab
    vocab = DomainVocab(modalities=("mri", "ct", "pet"), body_parts=("brain", "head"))  # as the embedded data lists them
    fresh = type(model)(model.config.replace(vocab=vocab), list(model.tasks.values()))
    init_from_checkpoint(fresh, SHIPPED_MULTITASK)
    for table, names, new in (("modality_latents", old.modalities, vocab.modalities),
                              ("body_part_latents", old.body_parts, vocab.body_parts)):
        theirs, mine = getattr(model.input_adaptformer, table), getattr(fresh.input_adaptformer, table)
        rows = [0] + [names.index(n) + 1 if n in names else 0 for n in new]
        assert torch.equal(mine, theirs[rows]), table
    assert torch.equal(fresh.input_adaptformer.modality_latents[3], model.input_adaptformer.modality_latents[0])  # pet
    image = torch.rand(1, 28, 28, 28, generator=torch.Generator().manual_seed(0))
    batch = lambda: Batch.from_images([image], [Domain("3d", "mri", "brain")])  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(batch()).embedding, model.eval()(batch()).embedding, atol=1e-5)


def test_names_work_where_checkpoint_folders_do(tmp_path):
    name = SHIPPED[0]
    model, _ = load_model(name)
    fresh = type(model)(model.config, list(model.tasks.values()))
    assert init_from_checkpoint(fresh, name) == len(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert "medexplore checkpoint" in load_backbone_weights(type(model)(model.config, []), name)
    with pytest.raises(CheckpointError, match=rf"not a medexplore checkpoint \(no such folder\) nor a shipped model name.*{name}"):
        load_model("no-such-model-v9")
    (tmp_path / name).mkdir()  # a local folder of the same name wins over the shipped model
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_model(tmp_path / name)


def test_models_command_lists_and_prints_cards():
    out = subprocess.run([sys.executable, "-m", "medexplore.cli", "models"], capture_output=True, text=True, check=True)
    assert all(name in out.stdout for name in SHIPPED)
    card = subprocess.run([sys.executable, "-m", "medexplore.cli", "models", "--card", SHIPPED[0]],
                          capture_output=True, text=True, check=True)
    assert card.stdout.startswith(f"# {SHIPPED[0]}")


def test_export_keeps_weights_and_drops_state_and_paths(tmp_path):
    model, _ = load_model(SHIPPED[0])
    source = save_checkpoint(tmp_path / "run" / "best", model, {"data": {"datasets": ["x"], "root": "/home/me/data"},
                                                                  "step": 7}, train_state={"step": torch.tensor(7)})
    out = export_checkpoint(source, tmp_path / "shared-v1", {"name": "shared-v1"})
    meta, weights, state = load_checkpoint(out)
    assert state is None and meta["data"] == {"datasets": ["x"], "root": None} and meta["step"] == 7
    assert meta["shipped"] == {"name": "shared-v1"}
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not OFFICIAL.exists(), reason="../shared/data/medmnist (official MedMNIST v2 files) is absent")
def test_shipped_medmnist_model_reproduces_its_recorded_test_auc():
    from medexplore.data.medmnist import MedMNIST
    from medexplore.train.evaluate import evaluate

    name = "medformer-medmnist5-v1"
    model, meta = load_model(name)
    recorded = meta["shipped"]["test_metrics"]["breastmnist"]
    measured = evaluate(model, MedMNIST("breastmnist", "test", root=OFFICIAL))["breastmnist"]
    assert measured["auc"] == pytest.approx(recorded["auc"], abs=1e-6)
    assert measured["acc"] == pytest.approx(recorded["acc"], abs=1e-6)
    assert pretrained_folder(name) is not None
