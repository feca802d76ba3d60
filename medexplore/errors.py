"""The one exception type for what a user got wrong (a bad value, file, checkpoint or request).

Front-ends print a :class:`UserError` as one line; any other exception is a bug and keeps its
traceback. It subclasses ``ValueError``, so ``except ValueError`` in user code still catches it.
"""
from __future__ import annotations

__all__ = ["UserError", "RunStopped"]


class UserError(ValueError):
    """Bad input: the message names the file, field or value and what would be accepted."""


class RunStopped(RuntimeError):
    """A run was stopped on request (a GUI's stop, Ctrl-C) with its last checkpoint kept; running the
    same command again continues it."""
