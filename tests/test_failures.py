"""Runs that fail, are interrupted or race end clean: each case through the CLI in a subprocess,
checking the exit code, the one-line message and the run folder afterwards."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_npz

pytestmark = pytest.mark.slow

TINY = ["--set", "model.depth=1", "--set", "model.embed_dim=24", "--set", "model.num_heads=2",
        "--set", "train.batch_size=4", "--set", "train.eval_batch_size=8", "--quiet"]
LONG = ["--set", "train.epochs=5000", "--set", "train.checkpoint_every=1"]  # never finishes: stopped or killed


def cli(*args, cwd=None, limit_file_size=None, check_one_line=True):
    """Run ``medexplore ARGS`` in a fresh process; returns (exit code, stderr's last line)."""
    def limits():
        if limit_file_size:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    result = subprocess.run([sys.executable, "-m", "medexplore.cli", *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, preexec_fn=limits, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    if check_one_line and result.returncode not in (0,):
        assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, lines[-1] if lines else ""


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "medexplore.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.2)


@pytest.fixture
def npz(tmp_path):
    return write_npz(tmp_path / "pneumoniamnist.npz", "pneumoniamnist", n=(16, 8, 8))


def train(npz, out, *extra):
    return ["train", "--dataset", "pneumoniamnist", "--data-path", npz, "--out", out, *TINY, *extra]


# ---------------------------------------------------------------------------- 1. typed configuration
@pytest.mark.parametrize("setting, message", [
    ("train.epochs=abc", "train.epochs: 'abc' is not an integer"),
    ("model.depth=two", "model.depth: 'two' is not an integer"),
    ("train.batch_size=8.5", "train.batch_size: 8.5 must be an integer"),
    ("train.lr=fast", "train.lr: 'fast' is not a number"),
    ("data.sizes=28", "data: unknown option(s) ['sizes']"),
    ("train.monitor=aucc", "train.monitor must be one of"),
    ("train.monitor=dice", "train.monitor 'dice' is not a validation metric of any task here"),
    ("train.lr=inf", "train.lr must be a finite number > 0"),
    ("train.clip_grad=-1", "train.clip_grad must be > 0"),
    ("train.num_workers=-1", "train.num_workers must be >= 0"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch must be >= 1"),
    ("train.device=tpu", "unknown device 'tpu'"),
    ("train.mode=vicreg", "train.mode is set by the command"),
    ("model.patch_size=5", "stem 'conv' needs a patch size that is a power of 2, got 5"),
    ("model.patch_size=8", "not divisible by the 2D patch size 8"),
])
def test_config_values_are_typed_and_checked(tmp_path, npz, setting, message):
    code, line = cli(*train(npz, tmp_path / "run", "--set", setting))
    assert code == 2 and message in line
    assert not (tmp_path / "run").exists()


def test_scientific_notation_from_the_readme_trains(tmp_path, npz):
    code, _ = cli(*train(npz, tmp_path / "run", "--set", "train.lr=3e-4", "--set", "train.epochs=1"))
    assert code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["lr"] == 3e-4


# ---------------------------------------------------------------------------- 2. data checked on load
def test_nan_pixels_are_named_before_training(tmp_path, npz):
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    images = arrays["val_images"].astype(np.float32)
    images[[2, 5], 3, 4] = np.nan
    arrays["val_images"] = images
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    code, line = cli(*train(bad, tmp_path / "run"))
    assert code == 2 and f"{bad}: val_images has NaN/Inf pixels in 2 image(s), indices [2, 5]" in line
    assert not (tmp_path / "run").exists()


def _folder_table(tmp_path, test_image: str):
    import nibabel as nib

    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    (tmp_path / "c.nii.gz").write_bytes(b"\x00" * 100)  # a damaged file
    rows = ["image,split,tumour", "a.nii.gz,train,1", "b.nii.gz,train,0", "a.nii.gz,val,1", f"{test_image},test,0"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "folder.yaml"
    config.write_text(f"data:\n  datasets: [folder]\n  csv: {tmp_path / 'labels.csv'}\n  multiple: 16\n  tasks:\n"
                      f"    - {{name: tumour, kind: binary, num_outputs: 1}}\n")
    return config


@pytest.mark.parametrize("test_image, message", [("c.nii.gz", "row 5: .*c.nii.gz: unreadable header"),
                                                 ("missing.nii.gz", "row 5: .*missing.nii.gz does not exist")])
def test_bad_test_rows_fail_before_training(tmp_path, test_image, message):
    import re

    config = _folder_table(tmp_path, test_image)
    code, line = cli("train", "--config", config, "--out", tmp_path / "run", *TINY)
    assert code == 2 and re.search(message, line), line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- 3, 4, 6. stuck folders, Ctrl-C, locks
def test_ctrl_c_saves_last_and_resume_finishes(tmp_path, npz):
    out = tmp_path / "run"
    proc = start(*train(npz, out, *LONG))
    wait_for(out / "metrics.jsonl", proc)  # a whole epoch done, the next one under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "continue with --resume" in err.strip().splitlines()[-1]
    step = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())["step"]
    assert step >= 4
    code, _ = cli(*train(npz, out, "--set", "train.epochs=3", "--set", "train.checkpoint_every=1"), "--resume")
    assert code == 0
    # one line per epoch after the resume, and each epoch's loss covers the whole epoch
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs)) == list(range(1, max(epochs) + 1))


def test_kill_before_the_first_checkpoint_leaves_a_reusable_folder(tmp_path, npz):
    out = tmp_path / "run"
    proc = start(*train(npz, out, "--set", "train.steps_per_epoch=1000000"))  # the first checkpoint is far away
    wait_for(out / "config.json", proc)
    proc.kill()
    proc.wait()
    assert not (out / "checkpoints").exists()
    code, _ = cli(*train(npz, out, "--set", "train.epochs=1"), "--resume")  # nothing to resume: starts over
    assert code == 0 and (out / "test_metrics.json").exists()


def test_nan_loss_message_is_true_and_the_folder_is_reusable(tmp_path, npz):
    out = tmp_path / "run"
    code, line = cli(*train(npz, out, "--set", "train.epochs=2", "--set", "train.lr=1e30",
                            "--set", "train.clip_grad=none", "--set", "train.warmup_fraction=0"))
    assert code == 3 and "non-finite loss" in line
    saved = (out / "checkpoints" / "last" / "meta.json").exists()
    assert ("no checkpoint had been saved yet" in line) != saved
    if not saved:
        assert cli(*train(npz, out, "--set", "train.epochs=1"))[0] == 0


def test_one_run_per_folder_and_no_stale_lock_after_kill(tmp_path, npz):
    out = tmp_path / "run"
    first = start(*train(npz, out, *LONG))
    wait_for(out / "checkpoints" / "last", first)
    code, line = cli(*train(npz, out, *LONG), "--resume")
    assert code == 2 and "in use by another running medexplore process" in line
    first.kill()
    first.wait()
    code, _ = cli(*train(npz, out, "--set", "train.epochs=1"), "--resume")  # the lock died with its process
    assert code == 0
    assert not [p.name for p in (out / "checkpoints").iterdir() if ".tmp" in p.name or ".old" in p.name]


# ---------------------------------------------------------------------------- 7. OS errors
def test_full_disk_is_one_line_and_the_folder_stays_usable(tmp_path, npz, monkeypatch):
    from medexplore.data.cache import array_cache_folder, memory_mapped_arrays

    monkeypatch.setenv("MEDEXPLORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code, line = cli(*train(npz, out, "--set", "train.epochs=1"), limit_file_size=8_000)  # the array cache first
    assert code == 2 and "could not write the array cache" in line and "File too large" in line
    assert not list(array_cache_folder(npz).glob("*.tmp"))
    memory_mapped_arrays(npz, [f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")])
    code, line = cli(*train(npz, out, "--set", "train.epochs=1"), limit_file_size=8_000)  # then the checkpoint
    assert code == 2 and "cannot write checkpoint" in line and "File too large" in line
    assert not [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else True
    assert cli(*train(npz, out, "--set", "train.epochs=1"))[0] == 0


def test_paths_of_the_wrong_kind(tmp_path, npz):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, line = cli(*train(npz, a_file))
    assert code == 2 and f"--out {a_file} is a file" in line
    code, line = cli("train", "--config", tmp_path, "--out", tmp_path / "run")
    assert code == 2 and "is a directory" in line
    out = tmp_path / "run"
    assert cli(*train(npz, out, "--set", "train.epochs=1"))[0] == 0
    folder = tmp_path / "emb"
    folder.mkdir()
    code, line = cli("embed", out / "checkpoints" / "last", "--output", folder)
    assert code == 2 and "is a directory" in line and list(folder.iterdir()) == []


# ---------------------------------------------------------------------------- 8, 9. the run's data, weights only
def test_resume_and_evaluate_use_the_runs_data(tmp_path, npz):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.npz").write_bytes(Path(npz).read_bytes())
    out = tmp_path / "run"
    args = ["train", "--dataset", "pneumoniamnist", "--data-path", "data.npz", "--out", out, *TINY, *LONG]
    proc = subprocess.Popen([sys.executable, "-m", "medexplore.cli", *map(str, args)], cwd=work,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    other = write_npz(tmp_path / "other.npz", "pneumoniamnist", n=(16, 8, 8), seed=3)
    code, line = cli(*train(other, out, *LONG), "--resume")
    assert code == 2 and "--resume with other data" in line and str(work / "data.npz") in line and str(other) in line
    stored = json.loads((out / "config.json").read_text())["data"]["path"]
    assert stored == str(work / "data.npz")  # absolute, so another directory finds it
    code, _ = cli("evaluate", out / "checkpoints" / "last", "--split", "val", cwd=tmp_path)
    assert code == 0


def test_weights_only_commands_ignore_a_bad_training_state(tmp_path, npz):
    out = tmp_path / "run"
    assert cli(*train(npz, out, "--set", "train.epochs=1"))[0] == 0
    last = out / "checkpoints" / "last"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"optimizer": Payload()}, last / "train_state.pt")
    assert cli("evaluate", last, "--split", "val")[0] == 0
    assert cli("embed", last, "--output", tmp_path / "e.npz")[0] == 0
    assert cli(*train(npz, tmp_path / "ft", "--set", "train.epochs=1"), "--init", last)[0] == 0
    code, line = cli(*train(npz, out, "--set", "train.epochs=2"), "--resume")
    assert code == 2 and "unreadable training state" in line and "never unpickled" in line
    assert not (tmp_path / "pwned").exists()
