"""The medexplore command line, end to end on small files, and its errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_npz

from medexplore.analysis import load_embeddings
from medexplore.cli import main
from medexplore.configs import load_config

TINY = ["--set", "model.depth=1", "--set", "model.embed_dim=24", "--set", "model.num_heads=2",
        "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.eval_batch_size=8", "--quiet"]


@pytest.fixture
def npz(tmp_path):
    return write_npz(tmp_path / "pneumoniamnist.npz", "pneumoniamnist", n=(16, 8, 8))


def test_train_evaluate_embed(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(out), *TINY]) == 0
    test = json.loads((out / "test_metrics.json").read_text())["pneumoniamnist"]
    assert {"auc", "acc", "f1_macro"} <= set(test) and test["n"] == 8
    assert (out / "checkpoints" / "last" / "model.safetensors").exists()
    assert main(["evaluate", str(out / "checkpoints" / "last"), "--split", "val", "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["pneumoniamnist"]["n"] == 8
    assert main(["embed", str(out / "checkpoints" / "last"), "--split", "test", "--output", str(tmp_path / "e.npz"),
                 "--blocks", "--quiet"]) == 0
    emb = load_embeddings(tmp_path / "e.npz")
    assert emb.pooled.shape == (8, 24) and emb.blocks.shape == (8, 1, 24) and list(emb.metadata["modality"][:1]) == ["xray"]
    assert emb.metadata["label:pneumoniamnist"].notna().sum() == 8 and "correct:pneumoniamnist" in emb.metadata
    assert main(["embed", str(out / "checkpoints" / "last"), "--output", str(tmp_path)]) == 2  # a directory
    # the run calibrated its best checkpoint on the validation split; calibrate does it for any checkpoint
    best = json.loads((out / "checkpoints" / "best" / "meta.json").read_text())["model"]["inference"]
    assert best["max_tokens"] == {"2d": 49}  # 28 x 28 with patch 4
    assert main(["calibrate", str(out / "checkpoints" / "last"), "--root", str(tmp_path)]) == 0
    assert json.loads((out / "checkpoints" / "last" / "meta.json").read_text())["model"]["inference"] == best
    assert main(["calibrate", "medformer-medmnist5-v1"]) == 2 and "shipped model" in capsys.readouterr().err
    # resume of a finished run is a no-op that still succeeds
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(out), "--resume", *TINY]) == 0


def test_pretrain_then_finetune(tmp_path, npz):
    pre = tmp_path / "pre"
    assert main(["pretrain", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(pre), *TINY,
                 "--set", "train.expander=[32,32]"]) == 0
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "ft"),
                 "--init", str(pre / "checkpoints" / "last"), *TINY]) == 0
    recorded = json.loads((tmp_path / "ft" / "config.json").read_text())  # where the weights came from
    assert recorded["init"] == str((pre / "checkpoints" / "last").resolve())
    assert json.loads((pre / "config.json").read_text())["init"] is None



def test_train_learn_retrains_named_parameters_on_a_frozen_model(tmp_path, npz, capsys):
    """``train.learn``: only the named parameters move; the rest stays bitwise the init's, and the result is a
    plain model (no adaptation recorded), so it loads, fine-tunes and adapts like any other."""
    from safetensors.torch import load_file

    from medexplore.train import load_model
    from medexplore.train.weights import learn_only

    base = tmp_path / "base"
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(base), *TINY]) == 0
    head = ["--set", "train.learn=[heads.pneumoniamnist.]", "--set", "train.lr=0.05"]
    out = tmp_path / "head"
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(out),
                 "--init", str(base / "checkpoints" / "last"), *TINY, *head]) == 0
    before = load_file(str(base / "checkpoints" / "last" / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("heads.pneumoniamnist.") for k in moved)
    assert "adaptation" not in json.loads((out / "checkpoints" / "last" / "meta.json").read_text())["model"]
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "bad"),
                 "--init", str(base / "checkpoints" / "last"), *TINY, "--set", "train.learn=[heads.lesion.]"]) == 2
    assert "no parameter of the model is or starts with ['heads.lesion.']" in capsys.readouterr().err
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "both"),
                 "--init", str(base / "checkpoints" / "last"), "--strategy", "lora", *TINY, *head]) == 2
    assert "both choose what learns" in capsys.readouterr().err
    model, _ = load_model(out / "checkpoints" / "last")
    assert learn_only(model, ["heads."]) == sum(p.numel() for p in model.heads.parameters())
    model.train()
    assert not model.blocks.training and model.heads.training and "blocks" in model.frozen_modules


def test_learn_names_whole_parts_of_parameter_names():
    """``heads.lesion`` is the lesion head, not ``heads.lesion_mask``; one task's latent queries can learn alone."""
    from conftest import small_model

    from medexplore.errors import UserError
    from medexplore.models import TaskSpec
    from medexplore.train.weights import learn_only

    model = small_model([TaskSpec("lesion", "binary", 1), TaskSpec("lesion_mask", "segmentation", 2)], seg_channels=8)
    head, query = model.heads["lesion"], model.output_adaptformer.queries["lesion"]
    expected = sum(p.numel() for p in head.parameters()) + query.numel()
    for prefixes in (["heads.lesion", "output_adaptformer.queries.lesion"], ["heads.lesion.", "output_adaptformer.queries.lesion."]):
        assert learn_only(model, prefixes) == expected
        learning = {n for n, p in model.named_parameters() if p.requires_grad}
        assert learning == {f"heads.lesion.{n}" for n, _ in head.named_parameters()} | {"output_adaptformer.queries.lesion"}
    with pytest.raises(UserError, match=r"is or starts with \['heads.lesio'\]"):
        learn_only(model, ["heads.lesio"])  # part of a name's part names nothing

@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'; available: \\['embedded', 'folder', 'natural', 'pathmnist'"),
    (["--dataset", "pneumoniamnist", "--data-path", "{bad}"], "not a readable npz file"),
    (["--dataset", "pneumoniamnist", "--data-path", "{npz}", "--set", "train.lr=-1"], "lr must be a finite number > 0"),
    (["--dataset", "pneumoniamnist", "--data-path", "{npz}", "--set", "model.widht=3"], r"unknown option\(s\) \['widht'\]"),
    (["--dataset", "pneumoniamnist", "--data-path", "{npz}", "--set", "nonsense"], "--set expects SECTION.KEY=VALUE"),
    (["--dataset", "pneumoniamnist", "--data-path", "{npz}", "--config", "{missing}"], "config file .* not found"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, npz, capsys, args, message):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    args = [a.format(bad=bad, npz=npz, missing=tmp_path / "none.yaml") for a in args]
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), *TINY]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_incompatible_checkpoint_and_busy_directory(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(out), *TINY]) == 0
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(out), *TINY]) == 2
    assert "holds a run; continue it with --resume" in capsys.readouterr().err
    wider = [a.replace("embed_dim=24", "embed_dim=48") for a in TINY]
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "r2"),
                 "--init", str(out / "checkpoints" / "last"), *wider]) == 2
    assert "incompatible with this model configuration" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2


def test_config_layers_and_entry_point(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {depth: 3}\ntrain: {lr: 0.01}\n")
    config = load_config(str(cfg), ["train.lr=0.02", "data.datasets=[a, b]"])
    assert config["model"] == {"name": "medformer_tiny", "patch_size": 4, "depth": 3}
    assert config["train"]["lr"] == 0.02 and config["data"]["datasets"] == ["a", "b"]
    proc = subprocess.run([sys.executable, "-m", "medexplore.cli", "datasets", "--root", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "organmnist3d" in proc.stdout and proc.stdout.count("\n") == 21
    help_text = subprocess.run([sys.executable, "-m", "medexplore.cli", "train", "--help"], capture_output=True, text=True)
    assert "--resume" in help_text.stdout


def test_shipped_configs_parse_and_build(tmp_path):
    from pathlib import Path

    from medexplore.train import TrainConfig
    from medexplore.train.workflow import build_model
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        config = load_config(str(path), [])
        TrainConfig.from_dict(config["train"])
        build_model({**config["model"], "depth": 1}, [])


def test_runs_are_reproducible_from_the_seed(tmp_path, npz):
    from safetensors.torch import load_file
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for run, seed in zip(runs, (0, 0, 1)):
        assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(run), *TINY,
                     "--set", f"train.seed={seed}"]) == 0
    a, b, c = (load_file(str(r / "checkpoints" / "last" / "model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tensorboard_logging_is_an_option(tmp_path, npz):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(out), *TINY,
                 "--set", "train.tensorboard=true"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "val/pneumoniamnist/auc" in tags
    assert len(events.Scalars("train/loss")) == 4  # 16 images, batch 4, one epoch


def test_a_bug_keeps_its_traceback_while_a_user_error_is_one_line(tmp_path, npz, monkeypatch, capsys):
    from medexplore.errors import UserError
    from medexplore.train import workflow

    def broken(*args, **kwargs):
        raise ValueError("internal shape mismatch")  # not a UserError: a bug, which must not look like bad input

    monkeypatch.setattr(workflow, "run_training", broken)
    args = ["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "r"), *TINY]
    with pytest.raises(ValueError, match="internal shape mismatch"):
        main(args)

    def refused(*args, **kwargs):
        raise UserError("data.size 13 is not published")

    monkeypatch.setattr(workflow, "run_training", refused)
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "medexplore train: error: data.size 13 is not published"


def test_recipes_are_data_that_builds_valid_runs():
    from medexplore.configs import RECIPE_NAMES, load_recipe, parse_overrides
    from medexplore.errors import UserError
    from medexplore.models.config import MedformerConfig
    from medexplore.train import TrainConfig
    from medexplore.typed import coerce_fields

    assert {"defaults", "experiments", "demo", "example", "adapt_bench", "model_sizes"} <= set(RECIPE_NAMES)
    sections = [load_recipe("demo"), load_recipe("adapt_bench"), *load_recipe("experiments").values(),
                *load_recipe("example").values()]
    for recipe in sections:
        for name in ("train", "pretrain"):
            if name in recipe:
                TrainConfig.from_dict(recipe[name])  # every value has its field's type
        if "model" in recipe:
            coerce_fields(MedformerConfig, recipe["model"], "model", extra={"name": str})
    for model in load_recipe("model_sizes").values():
        coerce_fields(MedformerConfig, model, "model", extra={"name": str})
    first = load_recipe("demo")
    first["train"]["lr"] = 99
    assert load_recipe("demo")["train"]["lr"] == 1e-3  # each call is a fresh copy
    assert parse_overrides(["train.lr=0.5", "model.depth=2"], ["model", "train"]) == {
        "train": {"lr": 0.5}, "model": {"depth": 2}}
    assert parse_overrides(["depth=2"], ["model"], flag="--model", section="model") == {"model": {"depth": 2}}
    with pytest.raises(UserError, match=r"--set 'optim.lr=1': unknown section 'optim'"):
        parse_overrides(["optim.lr=1"], ["model", "train"])
    with pytest.raises(UserError, match="--model expects KEY=VALUE, got 'depth'"):
        parse_overrides(["depth"], ["model"], flag="--model", section="model")
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_medmnist_flags_without_a_config_train_with_the_recipe_for_their_size(tmp_path, npz):
    from medexplore.configs import load_recipe
    from medexplore.train.recipes import apply_medmnist_recipe, uses_medmnist_recipe

    base = {"model": {"name": "medformer_tiny"}, "data": {"datasets": ["pneumoniamnist"], "path": str(npz)}, "train": {}}
    assert uses_medmnist_recipe(base) and not uses_medmnist_recipe({"data": {"datasets": ["embedded"]}})
    config, note = apply_medmnist_recipe(base)
    recipe = load_recipe("medmnist")
    assert config["model"] == {**recipe["model"], "patch_size_3d": None} and config["model"]["stem"] == "conv"
    assert config["train"]["epochs"] == round(recipe["samples"]["2d"] / 16)  # 16 training images in the file
    assert "training images" in note
    chosen, _ = apply_medmnist_recipe(base, {"train": {"epochs": 3}, "model": {"depth": 2}})
    assert chosen["train"]["epochs"] == 3 and chosen["model"]["depth"] == 2 and chosen["model"]["stem"] == "conv"


def test_a_recipe_run_from_a_checkpoint_keeps_the_checkpoints_architecture(tmp_path, npz, capsys):
    """The shipped model predates the recipe's instance stem and LayerScale: fine-tuning it still works."""
    from medexplore.configs import load_recipe
    from medexplore.train.recipes import apply_medmnist_recipe

    assert load_recipe("medmnist")["model"]["stem_norm"] == "instance"
    base = {"model": {"name": "medformer_tiny"}, "data": {"datasets": ["pneumoniamnist"], "path": str(npz)}, "train": {}}
    config, note = apply_medmnist_recipe(base, {"model": {"drop_path_rate": 0.0}}, init="medformer-medmnist5-v1")
    assert config["model"]["stem_norm"] == "group" and config["model"].get("layer_scale") is None
    assert config["model"]["drop_path_rate"] == 0.0 and "the architecture of medformer-medmnist5-v1" in note
    assert main(["train", "--dataset", "pneumoniamnist", "--data-path", str(npz), "--out", str(tmp_path / "ft"),
                 "--init", "medformer-medmnist5-v1", "--set", "train.epochs=1", "--quiet"]) == 0


def test_progress_printer_estimates_the_run_after_five_steps(capsys):
    from medexplore.train import Event
    from medexplore.train.progress import ProgressPrinter

    printer = ProgressPrinter(quiet=True)
    printer(Event("start", 0, 100))
    for step in range(1, 7):
        printer(Event("step", step, 100, eta_s=(100 - step) * 1.2, losses={"loss": 1.0}))
    lines = [line for line in capsys.readouterr().err.splitlines() if "estimated" in line]
    assert lines == ["estimated training time: 1.9 min for 95 more steps (from the first 5)"]


def test_progress_printer_times_the_first_epoch_with_its_validation(capsys):
    from medexplore.train import Event
    from medexplore.train.progress import ProgressPrinter

    now = [0.0]
    printer = ProgressPrinter(quiet=True, clock=lambda: now[0])
    printer(Event("start", 0, 40))
    for step in range(1, 11):  # 10 steps of 2 s, then 5 s of validation
        now[0] += 2.0
        printer(Event("step", step, 40, epoch=0, losses={"loss": 1.0}))
    now[0] += 5.0
    printer(Event("epoch", 10, 40, epoch=1, losses={"loss": 1.0}))
    printer(Event("epoch", 20, 40, epoch=2, losses={"loss": 1.0}))  # printed once
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch time")]
    assert lines == ["epoch time: 20 s training + 5 s validation; about 1.2 min for the remaining 3 epoch(s)"]


def test_patch_sizes_keep_a_sample_within_the_token_budget():
    from medexplore.train.recipes import patch_sizes_for

    assert patch_sizes_for({2: (28, 28), 3: (28, 28, 28)}, 4, 512) == {2: 4, 3: 4}  # 49 / 343 tokens
    assert patch_sizes_for({2: (224, 224), 3: (64, 64, 64)}, 4, 512) == {2: 16, 3: 8}  # 196 / 512
    assert patch_sizes_for({2: (224, 224), 3: (64, 64, 64)}, 4, 2048) == {2: 8, 3: 8}  # 784 / 512
    assert patch_sizes_for({2: (28, 28)}, 4, 16) == {2: 4}  # 8 does not divide 28: the largest that does


def test_the_recipe_picks_patch_8_for_64_cubed_volumes_and_says_so(tmp_path):
    from medexplore.train.recipes import apply_medmnist_recipe

    g = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        arrays[f"{split}_images"] = g.integers(0, 255, (n, 64, 64, 64), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(tmp_path / "adrenalmnist3d_64.npz", **arrays)
    base = {"data": {"datasets": ["adrenalmnist3d"], "path": str(tmp_path / "adrenalmnist3d_64.npz"), "size": 64},
            "model": {}, "train": {"device": "cpu"}}
    config, note = apply_medmnist_recipe(base)
    assert config["model"]["patch_size"] == 4 and config["model"]["patch_size_3d"] == 8
    assert "patch 8 for 64x64x64 (512 tokens) (token budget 512)" in note
    chosen, _ = apply_medmnist_recipe(base, {"model": {"patch_size_3d": 4}})
    assert chosen["model"]["patch_size_3d"] == 4
