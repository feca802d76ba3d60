"""Checkpoints: safetensors weights + JSON description + a tensors-only training state.

A checkpoint is a folder ``<run>/checkpoints/<name>/`` (or the name of a model shipped with medexplore,
:mod:`medexplore.pretrained`) holding ``model.safetensors``, ``meta.json``
(model config, tasks, domain vocabulary, run config, step) and, for resuming, ``train_state.pt``
(optimizer, scheduler and RNG state; loaded with ``weights_only=True``). It is written to a
temporary folder and swapped in with renames, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapt.strategies import model_from_spec
from ..errors import UserError
from ..models.inference_defaults import InferenceDefaults
from ..models.medformer import Medformer
from ..pretrained import pretrained_folder, pretrained_models

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "CheckpointError", "rng_state", "set_rng_state",
           "recover_checkpoints", "snapshot_name", "list_snapshots", "checkpoint_exists", "final_checkpoint",
           "init_from_checkpoint", "resolve_checkpoint", "export_checkpoint", "save_inference_defaults"]

FORMAT = "medexplore-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible with the requested model."""


def snapshot_name(step: int) -> str:
    """Folder name of the weights-only snapshot kept at ``step`` (``TrainConfig.keep_every``)."""
    return f"step_{step:07d}"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every snapshot a run kept, in step order."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoints folder (is this a run directory?)")
    found = []
    for path in folder.glob("step_*"):
        suffix = path.name[len("step_"):]
        if suffix.isdigit() and (path / "meta.json").exists():
            found.append((int(suffix), path))
    return sorted(found)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "gauss": [int(np_state[3]), float(np_state[4])]}}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; the tensors may come back on the training device (a CUDA run's train state)."""
    torch.set_rng_state(state["torch"].cpu())
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"], *np_state["gauss"]))


def save_checkpoint(folder: Path, model: Medformer, meta: dict, train_state: dict | None = None,
                    extra_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    ``extra_weights`` (e.g. a VICReg expander) are stored in the same safetensors file under ``extra.``.
    """
    folder = Path(folder)
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two writers never share a temporary name
    tmp = folder.with_name(f"{folder.name}.tmp-{unique}")
    old = folder.with_name(f"{folder.name}.old-{unique}")
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {folder}: {exc.strerror or exc}") from exc
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in (extra_weights or {}).items()})
        save_file(tensors, str(tmp / "model.safetensors"))
        full_meta = {"format": FORMAT, "model": model.spec_dict(), **meta}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, SafetensorError, RuntimeError) as exc:  # a full disk surfaces as any of these
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {folder} ({reason}); the previous one is kept") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)  # a killed writer's leftovers are cleared by recover_checkpoints
    return folder


def export_checkpoint(source: str | Path, folder: str | Path, record: dict | None = None) -> Path:
    """A weights-only copy of checkpoint ``source`` to share (what :mod:`medexplore.pretrained` ships).

    The copy drops the training state and the data section's machine paths (``root``, ``path``: users
    point at their own files), keeps the model, run config and validation metrics, and adds ``record``
    under ``"shipped"``. The copy is loaded back and compared tensor by tensor before this returns.
    """
    model, meta, extra = _rebuild(Path(source))
    kept = {k: v for k, v in meta.items() if k not in ("format", "model")}
    kept["data"] = {k: (None if k in ("root", "path") else v) for k, v in (meta.get("data") or {}).items()}
    kept["shipped"] = dict(record or {})
    out = save_checkpoint(Path(folder), model, kept, extra_weights=extra)
    copy, _ = load_model(out)
    if any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values())):
        raise CheckpointError(f"{out}: the exported weights differ from {source}")
    return out


def save_inference_defaults(folder: str | Path, defaults: InferenceDefaults) -> Path:
    """Store ``defaults`` in checkpoint ``folder``'s ``meta.json`` (``model.inference``; weights untouched,
    the file replaced atomically)."""
    path = _resolve(Path(folder)) / "meta.json"
    meta = json.loads(path.read_text())
    meta["model"] = {**meta["model"], "inference": defaults.to_dict()}
    tmp = path.with_name(f"meta.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path} ({exc.strerror or exc}); it is unchanged") from exc
    return path


def recover_checkpoints(checkpoints: str | Path) -> None:
    """Finish or undo saves that a killed writer left in ``checkpoints`` (call only while holding the run lock).

    A checkpoint caught between its two renames is moved back into place; every other temporary or
    superseded folder is removed.
    """
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return
    leftovers = [p for p in checkpoints.iterdir() if ".tmp-" in p.name or ".old" in p.name]
    for path in sorted(leftovers, key=lambda p: p.stat().st_mtime, reverse=True):  # newest first
        name = path.name.split(".old")[0] if ".old" in path.name else None
        if name and not (checkpoints / name).exists() and (path / "meta.json").exists():
            path.rename(checkpoints / name)
        else:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(spec: str | Path) -> Path:
    """The folder ``spec`` names: an existing path as given, else the shipped model of that name, else
    ``spec`` unchanged (loading it then says what is wrong)."""
    path = Path(str(spec)).expanduser()
    shipped = None if path.exists() else pretrained_folder(str(spec))
    return path if shipped is None else shipped


def _resolve(folder: Path) -> Path:
    folder = resolve_checkpoint(folder)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "meta.json").exists():
        olds = [p for p in folder.parent.glob(f"{folder.name}.old*") if (p / "meta.json").exists()]
        if olds:  # a crash between the two renames of a save
            return max(olds, key=lambda p: p.stat().st_mtime)
        if not folder.exists():
            raise CheckpointError(f"{folder}: not a medexplore checkpoint (no such folder) nor a shipped model name (shipped: "
                                  f"{', '.join(pretrained_models()) or 'none'}; `medexplore models` lists them)")
        raise CheckpointError(f"{folder}: not a medexplore checkpoint (no meta.json)")
    return folder


def checkpoint_exists(folder: str | Path) -> bool:
    """Whether ``folder`` holds a loadable checkpoint (also one a crash left between its two renames)."""
    try:
        _resolve(Path(folder))
    except CheckpointError:
        return False
    return True


def load_checkpoint(folder: Path, map_location="cpu", with_state: bool = True
                    ) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(meta, weights, train_state or None); never unpickles arbitrary objects.

    ``with_state=False`` leaves the training state unread (evaluation, embedding, fine-tuning).
    """
    folder = _resolve(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / 'meta.json'}: corrupt JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / 'meta.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        weights = load_file(str(folder / "model.safetensors"), device=str(map_location))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'}: unreadable weights: {exc}") from exc
    state = None
    if with_state and (folder / "train_state.pt").exists():
        try:
            state = torch.load(folder / "train_state.pt", map_location=map_location, weights_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                reason = "it holds objects other than tensors and plain values, which are never unpickled"
            raise CheckpointError(f"{folder / 'train_state.pt'}: unreadable training state ({reason}); "
                                  f"the weights alone still serve evaluate, embed and --init") from exc
    return meta, weights, state


def load_into(model: Medformer, weights: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Load model weights strictly; returns the ``extra.`` weights. Mismatches raise CheckpointError."""
    extra = {k[len("extra."):]: v for k, v in weights.items() if k.startswith("extra.")}
    own = {k: v for k, v in weights.items() if not k.startswith("extra.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(own[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"shape mismatch {shapes[:3]}" if shapes else ""]
        raise CheckpointError(f"{where}: incompatible with this model configuration: " + "; ".join(p for p in parts if p))
    model.load_state_dict(own)
    return extra


def _rebuild(folder: Path, map_location="cpu") -> tuple[Medformer, dict, dict[str, torch.Tensor]]:
    """(model with its weights, meta, the ``extra.`` weights) of a checkpoint."""
    meta, weights, _ = load_checkpoint(folder, map_location, with_state=False)
    try:
        model = model_from_spec(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{_resolve(folder) / 'meta.json'}: cannot rebuild the model: {exc}") from exc
    extra = load_into(model, weights, str(_resolve(folder)))
    return model.to(map_location), meta, extra


def load_model(folder: Path, map_location="cpu") -> tuple[Medformer, dict]:
    """Rebuild the model a checkpoint describes and load its weights: ``(model, meta)``."""
    model, meta, _ = _rebuild(folder, map_location)
    return model, meta


# the Input Adaptformer's tables with one row per vocabulary value (row 0: unknown)
_VOCAB_TABLES = {"input_adaptformer.modality_latents": "modalities", "input_adaptformer.body_part_latents": "body_parts"}


def _latents_by_name(weights: dict[str, torch.Tensor], checkpoint_vocab: dict, model: Medformer) -> None:
    """Re-index the checkpoint's modality / body-part latents (in ``weights``) to ``model``'s vocabulary: a
    value keeps its own latents whatever its index, one the checkpoint lacks starts from its ``unknown`` row
    (as :meth:`~medexplore.models.Medformer.extend_vocab` does)."""
    own = model.config.vocab
    for key, field_name in _VOCAB_TABLES.items():
        if key not in weights or field_name not in checkpoint_vocab:
            continue
        theirs = list(checkpoint_vocab[field_name])
        rows = [0] + [theirs.index(name) + 1 if name in theirs else 0 for name in getattr(own, field_name)]
        weights[key] = weights[key][rows]


def init_from_checkpoint(model: Medformer, folder: str | Path) -> int:
    """Fine-tuning: copy every tensor whose name and shape match; returns how many were copied.

    The domain latents follow their names: a run whose data lists its modalities or body parts in another
    order, or only some of them, gets each value's own latents. Raises CheckpointError when the body (patch
    embedding, blocks) does not match.
    """
    meta, weights, _ = load_checkpoint(Path(folder), with_state=False)
    vocab = meta.get("model", {}).get("config", {}).get("vocab")
    if vocab is not None and model.input_adaptformer is not None:
        _latents_by_name(weights, vocab, model)
    own = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    body = [k for k in own if k.startswith(("blocks.", "patch_embed."))]
    mismatched = [k for k in body if k not in matched]
    if mismatched:
        raise CheckpointError(f"{folder}: incompatible with this model configuration (body weights differ, "
                              f"e.g. {mismatched[:3]})")
    model.load_state_dict(matched, strict=False)
    return len(matched)


def final_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint a finished run is used through: ``best`` when validation chose one, else ``last``."""
    folder = Path(run_dir) / "checkpoints"
    return folder / "best" if checkpoint_exists(folder / "best") else folder / "last"
