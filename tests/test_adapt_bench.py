"""adapt-bench: a grid of cells written as they finish, continued after an interruption, and its report."""
import pandas as pd
import pytest
import torch

from medexplore.errors import RunStopped
from medexplore.experiments.adapt_bench import BenchSpec, bench_cells, run_adapt_bench
from medexplore.models import create_model
from medexplore.train import RunControl
from medexplore.train.checkpoint import save_checkpoint

SIZE = dict(depth=2, patch_size=8, embed_dim=32, num_heads=2, seg_channels=8)
RECIPE = {"epochs": 1, "steps_per_epoch": 3, "batch_size": 8, "lr": 1e-3, "eval_batch_size": 64}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    torch.manual_seed(0)
    medical = save_checkpoint(root / "medical", create_model("medformer_tiny", **SIZE), {"step": 0})
    general = save_checkpoint(root / "general", create_model("medformer_tiny", **SIZE), {"step": 0})
    return str(medical), str(general)


def test_grid_has_every_strategy_the_sweep_and_ood_cells(experts):
    spec = BenchSpec(medical=experts[0], general=experts[1], datasets=("embedded", "breastmnist"),
                     strategies=("linear", "vpt_deep", "gmoe"), prompt_counts=(1, 10, 50), sweep=("breastmnist",))
    keys = [c["key"] for c in bench_cells(spec, has_patients=lambda name: name == "embedded")]
    assert keys == ["embedded/linear", "embedded/vpt_deep-p10", "embedded/gmoe", "embedded/linear-ood",
                    "embedded/vpt_deep-p10-ood", "embedded/gmoe-ood", "breastmnist/linear", "breastmnist/vpt_deep-p10",
                    "breastmnist/gmoe", "breastmnist/vpt_deep-p1", "breastmnist/vpt_deep-p50"]
    no_general = BenchSpec(medical=experts[0], strategies=("lora", "gmoe"))
    assert [c["strategy"] for c in bench_cells(no_general)] == ["lora", "lora"]
    with pytest.raises(ValueError, match="not a medexplore checkpoint"):
        BenchSpec(medical="/nonexistent")
    with pytest.raises(ValueError, match="unknown strategies"):
        BenchSpec(medical=experts[0], strategies=("bitfit",))


def test_interrupted_bench_continues_and_reports(experts, tmp_path):
    spec = BenchSpec(medical=experts[0], general=experts[1], datasets=("embedded",), strategies=("lora", "gmoe"),
                     train=RECIPE)
    control = RunControl()
    seen = []

    def stop_in_second_cell(event):
        seen.append(event.kind)
        if event.kind == "step" and seen.count("start") == 2:
            control.stop()

    with pytest.raises(RunStopped, match="embedded/gmoe"):
        run_adapt_bench(spec, tmp_path, callbacks=[stop_in_second_cell], control=control, log=lambda _: None)
    assert list(pd.read_csv(tmp_path / "results.csv")["key"]) == ["embedded/lora"]
    table = run_adapt_bench(spec, tmp_path, log=lambda _: None)
    assert list(table["key"]) == ["embedded/lora", "embedded/gmoe", "embedded/lora-ood", "embedded/gmoe-ood"]
    assert list(table["resumed"]) == [False, True, False, False]  # the interrupted cell continued from its checkpoint
    assert (table["auc"].between(0, 1)).all() and (table["trainable"] < table["total"]).all()
    lora = table.loc[table.strategy == "lora", "backbone_trainable"].iloc[0]
    assert lora == 2 * 4 * ((32 + 96) + (32 + 32))  # depth x rank x (in + out) of qkv and proj
    ood = table[table.protocol == "patient_ood"]
    assert ood["ood_auc"].notna().all() and ood["held_out"].str.len().gt(0).all()
    report = (tmp_path / "results.md").read_text()
    assert "GMoE-Adapter AUC" in report and "Gate weight per modality" in report and "out-of-distribution" in report
    assert (tmp_path / "adapt_bench.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="other settings"):
        run_adapt_bench(BenchSpec(medical=experts[0], strategies=("full",), train=RECIPE), tmp_path)
