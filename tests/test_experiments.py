"""The experiments layer: one command per claim, resumable, a readable report."""
import json

import pandas as pd
import pytest

from medexplore.cli import main
from medexplore.errors import RunStopped
from medexplore.experiments import (
    EXPERIMENTS,
    Experiment,
    ExperimentSettings,
    Report,
    mean_spread,
    run_experiment,
    summarise,
)
from medexplore.experiments.base import arm_gaps, spread_verdict
from medexplore.train import RunControl

LIGHT = {"datasets": ["embedded"], "keep_tasks": ["lesion", "lesion_count"]}  # per-image tasks: no 3D decoders
TINY = {"model": {"depth": 2, "embed_dim": 32, "num_heads": 2, "seg_channels": 8},
        "train": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 8},
        "pretrain": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}}


def test_mean_spread_summarise_and_report(tmp_path):
    assert mean_spread([0.5, 0.7]) == "0.600 ± 0.141" and mean_spread([0.25]) == "0.250" and mean_spread([]) == "–"
    assert mean_spread([120, 130]) == "125 ± 7" and mean_spread([0, 4]) == "2 ± 3"  # counts without decimals
    assert mean_spread([1.0, 3.0]) == "2.000 ± 1.414"
    rows = [{"arm": "a", "seed": s, "v": v} for s, v in ((0, 1.0), (1, 3.0))] + [{"arm": "b", "seed": 0, "v": 2.0}]
    table = summarise(rows, ["arm"], ["v"])
    assert table.to_dict("records") == [{"arm": "a", "v": "2.000 ± 1.414", "n": 2}, {"arm": "b", "v": "2.000", "n": 1}]
    with pytest.raises(ValueError, match=r"no column\(s\) \['w'\]"):
        summarise(rows, ["arm"], ["w"])
    report = Report("Title", "What ran.")
    report.verdict("claim one", True, "3 of 4")
    report.verdict("claim two", None, "not run")
    report.verdict("claim three", "not shown", "1 of 4")
    with pytest.raises(ValueError, match="held must be one of"):
        report.verdict("claim four", "maybe", "")
    report.table("numbers", pd.DataFrame({"x": [1.23456, float("nan")], "y": ["a|b", "c"]}))
    text = report.write(tmp_path).read_text()
    assert "- **HELD**: claim one (3 of 4)" in text and "- **NOT TESTED**: claim two" in text
    assert "- **NOT SHOWN (within the seed spread)**: claim three" in text
    assert "| 1.235 | a\\|b |" in text and "| – | c |" in text


def test_arm_gaps_count_a_difference_only_beyond_the_seed_spread():
    rows = pd.DataFrame([
        *({"task": "a", "metric": "auc", "arm": arm, "value": v} for arm, v in
          (("new", 0.80), ("new", 0.82), ("old", 0.70), ("old", 0.72))),   # +0.10, sd 0.014: ahead
        *({"task": "b", "metric": "auc", "arm": arm, "value": v} for arm, v in
          (("new", 0.60), ("new", 0.80), ("old", 0.65), ("old", 0.66))),   # +0.045, sd 0.141: within
        *({"task": "c", "metric": "mae", "arm": arm, "value": v} for arm, v in
          (("new", 1.0), ("new", 1.0), ("old", 0.5), ("old", 0.5))),       # MAE higher: behind
    ])
    gaps = arm_gaps(rows, ["task", "metric"], "new", "old").set_index("task")
    assert gaps["gain"].round(3).to_dict() == {"a": 0.1, "b": 0.045, "c": -0.5}
    assert gaps["outcome"].to_dict() == {"a": 1, "b": 0, "c": -1}
    assert gaps.loc["b", "tolerance"] == pytest.approx(0.1414, abs=1e-4)
    assert arm_gaps(rows, ["task", "metric"], "new", "old", floor=0.2).outcome.tolist() == [0, 0, -1]
    assert spread_verdict([1, 1, 0]) is True and spread_verdict([-1, -1, 1]) is False
    assert spread_verdict([1, 0, 0]) == "not shown" and spread_verdict([1, -1, 0, 0]) == "not shown"
    with pytest.raises(ValueError, match="group by the metric too"):
        arm_gaps(rows, ["task"], "new", "old")


def test_imax_experiment_end_to_end_resumes_after_a_stop_and_reuses_finished_runs(tmp_path):
    settings = ExperimentSettings(data=LIGHT, seeds=(0,), overrides=TINY)
    control = RunControl()
    started = []

    def stop_in_the_second_run(event):
        if event.kind == "run":
            started.append(event.message)
        if event.kind == "step" and len(started) == 2:
            control.stop()

    with pytest.raises(RunStopped, match="decentralized-seed0 was stopped"):
        run_experiment("imax-vs-dmax", tmp_path / "imax", settings, callbacks=[stop_in_the_second_run], control=control)
    stopped_run = tmp_path / "imax" / "runs" / "decentralized-seed0"
    first_part = json.loads((stopped_run / "seconds.json").read_text())["seconds"]
    started.clear()
    report = run_experiment("imax-vs-dmax", tmp_path / "imax", settings, callbacks=[stop_in_the_second_run])
    assert started[0] == "imax-vs-dmax: decentralized-seed0"  # the finished image-centric run was reused
    outcome = json.loads((stopped_run / "outcome.json").read_text())
    assert 0 < first_part < outcome["seconds"]  # the stopped part's time is counted in the run's total
    text = report.read_text()
    assert text.count("- **") == 3 and "| lesion_count | mae |" in text and "gap recovered by pseudo-labels" in text
    assert (tmp_path / "imax" / "figures" / "imax_fisher.png").stat().st_size > 1000
    fisher = pd.read_csv(tmp_path / "imax" / "fisher.csv")
    assert set(fisher["arm"]) == {"image-centric", "decentralized"} and fisher["spectral_entropy"].notna().all()
    quality = json.loads((tmp_path / "imax" / "pseudo_labels" / "seed0.json").read_text())
    assert set(quality) == {"lesion", "lesion_count"}
    assert all(0 <= q["coverage"] <= 1 and q["kept"] <= q["missing"] for q in quality.values())
    metrics = pd.read_csv(tmp_path / "imax" / "metrics.csv")
    assert set(metrics["arm"]) == {"image-centric", "decentralized", "pseudo-labelled"}
    started.clear()
    run_experiment("imax-vs-dmax", tmp_path / "imax", settings, callbacks=[stop_in_the_second_run])
    assert started == []  # everything reused


def test_experiment_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="--budget must be one of"):
        ExperimentSettings(budget="huge")
    with pytest.raises(ValueError, match="--seeds repeats a seed"):
        ExperimentSettings(seeds=(1, 1))
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optim'\]"):
        ExperimentSettings(overrides={"optim": {}})
    Experiment("packing", tmp_path / "e", ExperimentSettings(overrides=TINY))
    with pytest.raises(FileExistsError, match="holds experiment 'packing' with other budget"):
        Experiment("packing", tmp_path / "e", ExperimentSettings(budget="full", overrides=TINY))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty and holds no experiment"):
        Experiment("packing", tmp_path / "other", ExperimentSettings())
    with pytest.raises(ValueError, match="unknown experiment 'imax'"):
        run_experiment("imax", tmp_path / "x")
    assert set(EXPERIMENTS) == {"imax-vs-dmax", "multitask-vs-single", "ssl-benefit", "packing", "adaptation"}


def test_cli_experiment_reports_bad_settings(tmp_path, capsys):
    assert main(["experiment", "packing", "--seeds", "0", "0", "--out", str(tmp_path / "p")]) == 2
    assert "--seeds repeats a seed" in capsys.readouterr().err
    assert main(["experiment", "packing", "--set", "epochs=3", "--out", str(tmp_path / "p")]) == 2
    assert "--set expects SECTION.KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("name, data, verdicts, table", [
    ("multitask-vs-single", LIGHT, 2, "| multitask (gradnorm) |"),
    ("ssl-benefit", LIGHT, 2, "| lesion_count | mae | 1% |"),
    ("packing", {"datasets": ["embedded"]}, 2, "grouped - padded"),
])
def test_experiment_end_to_end(tmp_path, name, data, verdicts, table):
    report = run_experiment(name, tmp_path / name, ExperimentSettings(data, seeds=(0,), overrides=TINY)).read_text()
    assert report.count("- **") == verdicts and table in report and "![" in report
    assert "Recipe changed with `--set`: `model.depth=2`" in report
    assert all((tmp_path / name / link.split("](")[1].split(")")[0]).exists() for link in report.split("![")[1:])
    assert len(pd.read_csv(tmp_path / name / "metrics.csv"))


def test_adaptation_report_folds_the_benches_and_scores_gmoe_against_the_best_single_expert(tmp_path):
    from medexplore.experiments.adaptation import _report

    rows = []
    for seed, gmoe in ((0, 0.80), (1, 0.76)):
        for strategy, auc in (("full", 0.70), ("linear", 0.60), ("adapter", 0.75), ("lora", 0.74), ("gmoe", gmoe)):
            rows.append({"dataset": "embedded", "strategy": strategy, "prompts": 0, "protocol": "standard", "auc": auc,
                         "dice": float("nan"), "trainable": 10, "step_memory_mb": 1.0, "seconds": 2.0, "seed": seed})
    exp = Experiment("adaptation", tmp_path / "a", ExperimentSettings(overrides=TINY))
    text = _report(exp, pd.DataFrame(rows)).markdown()
    # GMoE minus the best single-expert method (adapter 0.75): +5 and +1 points
    assert "- **HELD**: the GMoE-Adapter beats" in text and "embedded 3.00 ± 2.83 points" in text
    assert "| embedded | gmoe | 0.780 ± 0.028 |" in text
    mixed = pd.DataFrame(rows)
    mixed.loc[(mixed.strategy == "gmoe") & (mixed.seed == 1), "auc"] = 0.72  # gains +5 and -3: inside the spread
    text = _report(exp, mixed).markdown()
    assert "- **NOT SHOWN (within the seed spread)**: the GMoE-Adapter beats" in text and "embedded 1.00 ± 5.66" in text


def test_multitask_arms_give_every_dataset_its_single_model_exposure_when_several(tmp_path):
    from medexplore.experiments.multitask import multitask_arms

    one = Experiment("multitask-vs-single", tmp_path / "one", ExperimentSettings(overrides=TINY))
    assert [key for _, key, _ in multitask_arms(one)] == ["multitask-fixed", "multitask-uncertainty", "multitask-gradnorm"]
    two = Experiment("multitask-vs-single", tmp_path / "two",
                     ExperimentSettings({"datasets": ["pneumoniamnist", "breastmnist"], "root": str(tmp_path)},
                                        overrides=TINY))
    arms = multitask_arms(two)
    assert all(train["balance"] == "source" for _, _, train in arms)
    assert arms[-1] == ("multitask (fixed, 2x steps)", "multitask-fixed-equal-exposure",
                        {"loss_balance": "fixed", "steps_per_epoch": 2 * TINY["train"]["steps_per_epoch"],
                         "balance": "source"})
