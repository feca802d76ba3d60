"""One OpenMP thread team per process: free the calling thread's idle team before another thread computes.

Every thread that runs parallel PyTorch CPU work owns an OpenMP team whose helper threads stay alive after it.
With GNU OpenMP (PyTorch's runtime on Linux), once the teams hold more threads than there are CPUs, every team's
helpers stop spin-waiting between parallel regions and sleep instead, so a worker thread that computes while a
GUI thread's idle team exists runs 20-40% slower than the same call on the main thread (``benchmarks/
bench_inference.py --only thread``). A front-end that computes in a worker frees its own thread's team first.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

__all__ = ["release_thread_team"]

_PAUSE_HARD = 2  # omp_pause_hard in omp.h


@functools.cache
def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime that this process's PyTorch uses, or None (another runtime, or not Linux)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    paths = sorted(path for path in paths if os.path.basename(path).startswith("libgomp"))
    if not paths:
        return None
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    path = next((p for p in paths if p.startswith(torch_lib)), paths[0])
    library = ctypes.CDLL(path)  # already loaded: the same handle, not a second copy
    return library if hasattr(library, "omp_pause_resource_all") else None


def release_thread_team() -> bool:
    """Free the calling thread's idle OpenMP team (GNU OpenMP only; other threads' teams are untouched).

    Returns True when the runtime released it (or the thread had none), False where this is not supported or
    the thread is inside a parallel region. The thread's next parallel operation builds a new team.
    """
    library = _gnu_openmp()
    # libgomp's pause frees only the calling thread's pool; LLVM's libomp would shut down every thread's, so it is
    # never called there
    return library is not None and library.omp_pause_resource_all(_PAUSE_HARD) == 0
