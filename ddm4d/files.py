"""File permissions for atomic writes: mkstemp makes private (0600) files; outputs get the usual mode."""
from __future__ import annotations

import os
import threading

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask. Reading it means setting it, so threads writing files (generate's writer
    pool) take turns, or one could read the 0 another set and leave it in place."""
    with _UMASK_LOCK:
        value = os.umask(0)
        os.umask(value)
    return value


def make_public(path: str | os.PathLike) -> None:
    """Give a temporary file the mode a plain open() would have (0666 less the umask)."""
    os.chmod(path, 0o666 & ~umask())
