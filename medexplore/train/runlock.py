"""One run per folder: an exclusive lock held for the run's life, released by the OS if the process dies."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import UserError

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLockedError(UserError):
    """Another process is running in this folder."""


class RunLock:
    """``with RunLock(folder):`` creates ``folder`` and holds ``folder/.lock`` (flock) until the block ends.

    A kill -9 releases the lock with the process, so no stale lock is ever left behind.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a run directory")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{self.folder} is in use by another running medexplore process; "
                                 "wait for it or choose another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
