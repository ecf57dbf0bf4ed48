"""One process at a time: an advisory file lock around work that two runs must not do at once.

`flock` rather than a lock file that is created and deleted: the kernel releases it when its holder
exits, however it exits (SIGKILL, OOM), so a crash never leaves a lock that blocks every later run.
The file itself stays; deleting it would let a waiting process and a newcomer lock two different files.
"""

from __future__ import annotations

import errno
import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


# A filesystem without lock support answers flock with one of these.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the body; waits while another holds it.

    On a filesystem that cannot lock (some network volumes) the body runs unlocked, with a warning:
    the work it guards stays correct on its own (atomic renames), only no longer done once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            logger.warning("%s: the filesystem does not support locks (%s); going on without one", path, error)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
