"""Arrays of an ``.npz`` file as memory-mapped ``.npy`` files, so that resident memory stays bounded.

A (compressed) ``.npz`` cannot be memory-mapped, so each array is decompressed once, streamed in
chunks, to ``$MEDEXPLORE_CACHE/arrays/<file>-<key>/<array>.npy`` and opened with ``np.load(...,
mmap_mode="r")``: only the pages a sample touches are read. ``manifest.json`` records the source
file's size and modification time and each ``.npy``'s size and SHA-256; a cache whose ``.npy`` no
longer matches (truncated, edited, corrupt) is rebuilt with a one-line warning, and a changed source
gets a new key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError

__all__ = ["cache_dir", "memory_mapped_arrays", "array_cache_folder"]

log = logging.getLogger(__name__)
CHUNK = 1 << 22  # bytes per read while copying and hashing


def cache_dir() -> Path:
    """Where medexplore keeps what it builds once: ``$MEDEXPLORE_CACHE`` or ``~/.cache/medexplore``."""
    return Path(os.environ.get("MEDEXPLORE_CACHE", Path.home() / ".cache" / "medexplore"))


def array_cache_folder(path: str | Path) -> Path:
    """The cache folder of ``path``: named after the file, keyed by its absolute path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "arrays" / f"{path.stem}-{key}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: zipfile.ZipFile, name: str, target: Path, source: Path) -> dict:
    """Stream member ``name.npy`` to ``target`` (an ``.npy`` inside an ``.npz`` is a whole ``.npy`` file)."""
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        with archive.open(f"{name}.npy") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        tmp.replace(target)
    except OSError as exc:  # e.g. a full disk: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise OSError(f"{source}: could not write the array cache {target} ({exc}); free space there or "
                      f"set MEDEXPLORE_CACHE to another folder") from exc
    stat = target.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(target)}


def _checked(target: Path, entry: dict | None) -> dict | None:
    """``entry`` if ``target`` still matches it (size; the hash only when the mtime moved, then the new
    mtime recorded), else None."""
    if entry is None or not target.exists():
        return None
    stat = target.stat()
    if stat.st_size != entry["size"]:
        return None
    if stat.st_mtime_ns == entry["mtime_ns"]:
        return entry
    return {**entry, "mtime_ns": stat.st_mtime_ns} if _sha256(target) == entry["sha256"] else None


def memory_mapped_arrays(path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Arrays ``names`` of the ``.npz`` at ``path``, each a read-only memory map of its cached ``.npy``.

    Raises :class:`UserError` naming the file when it is not a readable archive or lacks an array.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a readable npz file (corrupt, truncated, or not an npz archive)")
    folder = array_cache_folder(path)
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    except (OSError, ValueError):
        manifest = {}
    arrays, changed = {}, False
    try:
        with zipfile.ZipFile(path) as archive:
            members = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
            missing = sorted(set(names) - members)
            if missing:
                raise UserError(f"{path}: missing array(s) {missing}; found {sorted(members)}")
            for name in names:
                target = folder / f"{name}.npy"
                entry = _checked(target, manifest.get(name))
                if entry is None:
                    if name in manifest:
                        log.warning("%s: cached array %s did not match its record; rebuilt from the npz", path, target)
                    folder.mkdir(parents=True, exist_ok=True)
                    entry = _extract(archive, name, target, path)
                changed |= entry != manifest.get(name)
                manifest[name] = entry
                arrays[name] = np.load(target, mmap_mode="r", allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"{path}: not a readable npz file (corrupt or truncated?): {exc}") from exc
    if changed:
        tmp = manifest_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(manifest_path)
    return arrays
