"""Benchmark scripts: those that need hardware CI lacks still parse their arguments and import what they run;
the others run end to end on small inputs or the shipped model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_checks_arguments_and_imports_then_stops():
    script = ROOT / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps: tests, throughput, varlen, compile, torchrun, inference" in proc.stdout
    assert "dry run: arguments and imports checked; nothing run" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--dry-run", "--steps", "warp-drive"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'warp-drive'" in bad.stderr


def test_early_steps_prints_the_stems_and_blocks_token_diversity(tmp_path):
    from conftest import write_npz

    write_npz(tmp_path / "adrenalmnist3d.npz", "adrenalmnist3d", n=(8, 4, 4))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "early_steps.py"), "--root", str(tmp_path),
                           "--dataset", "adrenalmnist3d", "--images", "8", "--batch-size", "4", "--steps", "2",
                           "--every", "1", "--lrs", "1e-3", "1e-4", "--set", "model.stem_norm=instance",
                           "--set", "model.layer_scale=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("step"))
    assert header.split() == ["step", "loss", "logit", "sd", "stem", "input"] + [f"block{i}" for i in range(6)]
    rows = [line.split() for line in proc.stdout.splitlines() if line[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2] * 2
    assert all(0.0 <= float(v) <= 1.5 for r in rows for v in r[4:])  # diversity ratios
    assert "against lr 0.001: lr 0.0001: loss after 2 steps" in proc.stdout


def test_sample_findings_of_the_shipped_model_meet_the_sample_goals_and_keep_its_3d_lesion_count(tmp_path):
    """The shipped default model on the samples napari opens, through the benchmark that its card quotes."""
    out = tmp_path / "findings.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sample_findings.py"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    retina, brain = rows["retina"], rows["mni152 lesions"]
    for lesioned in (retina, brain):
        assert [row["seed"] for row in lesioned] == [0, 1, 2, 3, 4] and all(row["lesions"] == 3 for row in lesioned)
    assert sum(row["found"] for row in retina) == 15 and min(row["dice"] for row in retina) >= 0.6
    assert "| retina, 5 seeds | 15/15 |" in proc.stdout
    # 3D lesions in the whole volume are this model's known weakness (the card): it finds 2 of 15 and marks
    # no healthy voxel; a change that loses those or draws more than a few boxes elsewhere fails here
    found_3d = sum(row["found"] for row in brain)
    assert found_3d >= 2 and sum(row["boxes"] for row in brain) <= found_3d + 2
    assert f"| mni152 lesions, 5 seeds | {found_3d}/15 |" in proc.stdout
    for healthy in ("mni152", "ct"):
        assert rows[healthy]["boxes"] == 0 and rows[healthy]["lesion_fraction"] < 1e-3, (healthy, rows[healthy])
    assert min(rows["mni152"]["tissue_dice"].values()) >= 0.85, rows["mni152"]["tissue_dice"]


def test_inference_benchmark_prints_each_saving_against_its_reference():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--size", "32", "--reps", "1",
                           "--no-sample", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].lstrip("| ") for r in rows] == [
        "infer_image, 32^3", "infer_image, 32^3",
        "train step, 4 x 16^3, lesion, lesion_count, lesion_boxes, lesion_mask, adrenalmnist3d, vesselmnist3d, tissue",
        "train step, 32 x 28^3, the MedMNIST recipe's model", *["infer_image + rollout + Grad-CAM of lesion, 32^3"] * 2,
        "infer_image, 32^3, tissue labels"]
    assert [r[1] for r in rows] == ["cat, then reordered"] + ["default layout"] * 3 + [
        "every head", "full products", "argmax(0)"]
    for r in rows:  # the speed-up is the ratio of the two medians printed beside it, within their rounding
        ref, new, speed_up = float(r[2]), float(r[4]), float(r[5].rstrip("x |"))
        assert ref > 0 and new > 0, r
        low, high = max(ref - 0.005, 1e-9) / (new + 0.005), (ref + 0.005) / max(new - 0.005, 1e-9)
        assert low - 0.005 <= speed_up <= high + 0.005, r
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--size", "30"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--size a multiple of 8" in bad.stderr


def test_medmnist_benchmark_restarts_a_run_stopped_before_its_first_checkpoint_with_a_fresh_clock(
        tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_medmnist", ROOT / "benchmarks" / "medmnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "one-model-seed2"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "wall_seconds.txt").write_text("999.0\n")  # the clock of a run stopped before any checkpoint
    commands = []

    def stopped(cmd, **kwargs):
        commands.append(cmd)
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(bench.subprocess, "run", stopped)
    with pytest.raises(subprocess.CalledProcessError):
        bench.run_cli(["--dataset", "breastmnist"], tmp_path, 2, out, ["breastmnist"])
    assert "--resume" not in commands[0]
    assert float((out / "wall_seconds.txt").read_text()) < 999.0
    (out / "checkpoints" / "last").mkdir(parents=True)  # one that saved a checkpoint resumes, its clock kept
    with pytest.raises(subprocess.CalledProcessError):
        bench.run_cli(["--dataset", "breastmnist"], tmp_path, 2, out, ["breastmnist"])
    assert "--resume" in commands[1]


def test_paired_levers_gives_the_readmes_three_seed_figures_for_exact_balancing():
    """Known answer: the README's exact ``source_label`` table (+0.033 / +0.018 / -0.004, mean +0.016, standard
    error 0.011) from the committed outcomes, and the rule's verdict on them."""
    levers = ROOT / "docs" / "experiments" / "medmnist5" / "levers"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "paired_levers.py"),
           "--recipe", *[str(levers / f"instance-layerscale-seed{s}.json") for s in (0, 1, 2)],
           "--lever", *[str(levers / f"source-label-exact-seed{s}.json") for s in (2, 0, 1)]]  # paired by seed
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 0 | 0.860 | 0.893 | +0.033 |" in proc.stdout and "| 2 | 0.898 | 0.894 | -0.004 |" in proc.stdout
    assert "mean difference +0.0155, standard error 0.0110" in proc.stdout
    assert "vesselmnist3d +0.062" in proc.stdout and "verdict: not adopted" in proc.stdout
    one = subprocess.run(cmd[:4] + cmd[6:7] + cmd[8:9], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode != 0 and "need at least two seeds run by both" in one.stderr


def test_lesions_on_real_images_prints_a_row_per_file_and_model_and_names_an_empty_folder(tmp_path):
    from conftest import write_npz

    write_npz(tmp_path / "breastmnist.npz", "breastmnist", n=(4, 2, 3))
    write_npz(tmp_path / "adrenalmnist3d.npz", "adrenalmnist3d", n=(4, 2, 3))
    script = str(ROOT / "benchmarks" / "lesions_on_real_images.py")
    proc = subprocess.run([sys.executable, script, "medformer-medmnist-embedded-v5", "--root", str(tmp_path),
                           "--per-file", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r[0].strip("| ") for r in rows] == ["adrenalmnist3d", "breastmnist"]
    for row in rows:
        assert row[2].endswith("%") and 0 <= float(row[2][:-1]) <= 100 and 0 <= float(row[4]) <= 100
        # P(lesion), and the count head's answer (a regression: slightly negative on noise like this)
        assert 0 <= float(row[5]) <= 1 and abs(float(row[6].strip(" |"))) < 10
    empty = subprocess.run([sys.executable, script, "--root", str(tmp_path / "none")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode != 0 and "no MedMNIST .npz files in" in empty.stderr
