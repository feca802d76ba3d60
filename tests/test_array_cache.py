"""MedMNIST files read through the memory-mapped array cache: bounded memory, changed caches rebuilt."""
import json
import logging
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import write_npz

from medexplore.data.cache import array_cache_folder, memory_mapped_arrays
from medexplore.data.medmnist import MedMNIST

VOLUME = (28, 28, 28)


def test_samples_equal_the_files_pixels_and_come_from_a_memory_map(tmp_path):
    path = write_npz(tmp_path / "vesselmnist3d.npz", "vesselmnist3d")
    data = MedMNIST("vesselmnist3d", "train", path=path)
    assert isinstance(data.raw_images, np.memmap)
    raw = np.load(path)["train_images"]
    torch.testing.assert_close(data[3].image, torch.from_numpy(raw[3]).float()[None] / 127.5 - 1)
    torch.testing.assert_close(data.images[3], data[3].image)
    rgb = MedMNIST("retinamnist", "val", path=write_npz(tmp_path / "retinamnist.npz", "retinamnist"))
    raw = np.load(tmp_path / "retinamnist.npz")["val_images"]
    torch.testing.assert_close(rgb[1].image, torch.from_numpy(raw[1]).float().permute(2, 0, 1) / 127.5 - 1)


@pytest.mark.parametrize("damage", ["truncate", "same size, other bytes"])
def test_a_changed_cache_is_detected_and_rebuilt_with_one_line(tmp_path, damage, caplog):
    path = write_npz(tmp_path / "pneumoniamnist.npz", "pneumoniamnist")
    expected = np.load(path)["train_images"]
    memory_mapped_arrays(path, ["train_images"])
    cached = array_cache_folder(path) / "train_images.npy"
    blob = bytearray(cached.read_bytes())
    if damage == "truncate":
        del blob[-100:]
    else:
        blob[-100:] = bytes(255 - b for b in blob[-100:])
    cached.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="medexplore.data.cache"):
        again = memory_mapped_arrays(path, ["train_images"])["train_images"]
    np.testing.assert_array_equal(again, expected)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "did not match its record; rebuilt" in messages[0] and str(path) in messages[0]


def test_an_unchanged_cache_is_reused_and_a_changed_source_gets_a_new_one(tmp_path):
    path = write_npz(tmp_path / "breastmnist.npz", "breastmnist")
    memory_mapped_arrays(path, ["val_images"])
    folder = array_cache_folder(path)
    stamp = (folder / "val_images.npy").stat().st_mtime_ns
    memory_mapped_arrays(path, ["val_images"])
    assert (folder / "val_images.npy").stat().st_mtime_ns == stamp
    assert json.loads((folder / "manifest.json").read_text())["val_images"]["sha256"]
    os.utime(folder / "val_images.npy", ns=(stamp + 5, stamp + 5))  # touched, content unchanged: re-hashed once
    inode = (folder / "val_images.npy").stat().st_ino
    memory_mapped_arrays(path, ["val_images"])
    assert (folder / "val_images.npy").stat().st_ino == inode  # not rebuilt
    assert json.loads((folder / "manifest.json").read_text())["val_images"]["mtime_ns"] == stamp + 5
    write_npz(path, "breastmnist", seed=1)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert array_cache_folder(path) != folder
    np.testing.assert_array_equal(memory_mapped_arrays(path, ["val_images"])["val_images"], np.load(path)["val_images"])


def test_a_full_disk_leaves_no_half_written_cache_and_names_the_folder(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "breastmnist.npz", "breastmnist")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("medexplore.data.cache.shutil.copyfileobj", full)
    with pytest.raises(OSError, match="could not write the array cache .*No space left.*MEDEXPLORE_CACHE"):
        memory_mapped_arrays(path, ["train_images"])
    assert not [p for p in array_cache_folder(path).glob("*") if p.suffix in (".tmp", ".npy")]


def _write_large_npz(path, train: int, small: int = 8):
    """A vesselmnist3d-layout npz streamed to disk chunk by chunk (never whole in this process): ``train``
    volumes that compress well (constant per volume), so the file is small and its arrays are large."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for split, count in (("train", train), ("val", small), ("test", small)):
            with archive.open(f"{split}_images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": (count, *VOLUME)})
                for start in range(0, count, 1000):
                    n = min(1000, count - start)
                    f.write(np.repeat((np.arange(start, start + n) % 200).astype(np.uint8), np.prod(VOLUME)).tobytes())
            labels = (np.arange(count) % 2).astype(np.uint8)[:, None]
            with archive.open(f"{split}_labels.npy", "w") as f:
                np.lib.format.write_array(f, labels)


def _peak_rss_mb(code: str, env: dict) -> float:
    """Peak RSS (VmHWM, this process's own memory map; ru_maxrss would also count the parent's memory at
    the fork that started it) of a fresh Python running ``code``."""
    report = "import re; print('PEAK_RSS_MB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    proc = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.rsplit("PEAK_RSS_MB", 1)[1].split()[0]) / 1024


def test_a_file_larger_than_the_memory_bound_trains_and_embeds_within_it(tmp_path):
    """The training split is 1,151 MB as uint8 (4.6 GB as the float tensors an in-memory reader made):
    training one epoch (a few steps, validation and test) and ``embed`` (of the file's small test split)
    each stay within 400 MB above what importing the CLI and the trainer costs, less than the split."""
    allowance_mb, train = 400, 55_000
    path = tmp_path / "vesselmnist3d.npz"
    _write_large_npz(path, train)
    split_mb = train * np.prod(VOLUME) / 2**20
    assert split_mb > allowance_mb
    env = {**os.environ, "MEDEXPLORE_CACHE": str(tmp_path / "cache")}
    baseline = _peak_rss_mb("import medexplore.cli, medexplore.train.workflow, medexplore.analysis", env)
    run = tmp_path / "run"
    commands = [
        ["train", "--dataset", "vesselmnist3d", "--data-path", str(path), "--out", str(run), "--quiet",
         "--set", "train.epochs=1", "--set", "train.steps_per_epoch=3", "--set", "train.batch_size=4",
         "--set", "model.depth=1"],
        ["embed", str(run / "checkpoints" / "best"), "--split", "test", "--output", str(tmp_path / "e.npz"), "--quiet"],
    ]
    for args in commands:
        peak = _peak_rss_mb(f"import sys; from medexplore.cli import main; assert main({args!r}) == 0", env)
        print(f"{args[0]} on a {split_mb:.0f} MB split: peak RSS {peak:.0f} MB, imports alone {baseline:.0f} MB")
        assert peak - baseline < allowance_mb, f"{args[0]}: peak RSS {peak:.0f} MB, imports alone {baseline:.0f} MB"
    assert len(np.load(tmp_path / "e.npz")["pooled"]) == 8
