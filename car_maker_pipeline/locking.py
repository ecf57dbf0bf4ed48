"""One process at a time: an advisory file lock around work that two runs must not do at once.

`flock` rather than a lock file that is created and deleted: the kernel releases it when its holder
exits, however it exits (SIGKILL, OOM), so a crash never leaves a lock that blocks every later run.
The file itself stays; deleting it would let a waiting process and a newcomer lock two different files.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the body; waits while another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
