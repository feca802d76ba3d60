"""Load triton's LLVM beside an OpenGL driver's LLVM without a crash.

Mesa's software renderer (llvmpipe: Xvfb, remote desktops, VMs without a GPU driver) maps its own
libLLVM into the process when napari creates its canvas. triton's extension module bundles another
LLVM; loaded afterwards with the default symbol lookup, its static initialisers bind to Mesa's copy
and the process dies with a segmentation fault. torch imports triton from ``torch._dynamo`` (which
timm imports), so the first plugin widget that builds a model would take napari down.

Loading triton's extension with ``RTLD_DEEPBIND`` makes it resolve its own LLVM first. Nothing is
done when triton is already loaded, not installed, or no LLVM is mapped yet.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TRITON_EXTENSION = "triton._C.libtriton"


def mapped_llvm(maps: Path = Path("/proc/self/maps")) -> str | None:
    """Path of a libLLVM shared object already mapped into this process, or None."""
    try:
        text = maps.read_text()
    except OSError:  # not Linux
        return None
    for line in text.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if "/libLLVM" in path:
            return path
    return None


def isolate_triton_from_mesa() -> bool:
    """Import triton's extension with RTLD_DEEPBIND if another LLVM is mapped; True if it did."""
    if TRITON_EXTENSION in sys.modules or not hasattr(os, "RTLD_DEEPBIND") or mapped_llvm() is None:
        return False
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        importlib.import_module(TRITON_EXTENSION)
    except ImportError:  # a broken triton install: torch copes without it, as it would have anyway
        return False
    finally:
        sys.setdlopenflags(flags)
    return True
