"""Atomic writes and the small manifests through which assets find each other's outputs.

Assets write their data to versioned folders themselves (Arrow, parquet, safetensors) rather than
pickling it through Dagster's default IO manager; a manifest JSON written last, atomically, says
which folder is current. A crash therefore leaves either the old manifest or the new one, never a
half-written folder that a reader would trust.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def writer_id() -> str:
    """`<pid>@<host>` of this process: who is writing, so a leftover of a dead writer can be recognised."""
    return f"{os.getpid()}@{socket.gethostname()}"


def writer_alive(writer: str | None) -> bool:
    """Whether the process a `writer_id()` names may still run: False only for a dead pid on this host."""
    pid, _, host = (writer or "").partition("@")
    if not pid.isdigit() or host != socket.gethostname():
        return True  # unknown, or another host's (a pid means nothing here): assume alive
    return _pid_alive(int(pid))


def writer_on_this_host(writer: str | None) -> bool:
    """Whether a `writer_id()` names a process of this host (whose pid `writer_alive` can check)."""
    pid, _, host = (writer or "").partition("@")
    return pid.isdigit() and host == socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# `.{name}.tmp-{pid}@{host}@<random>`: the writer's pid and host, so a leftover can be told apart
# from a live writer's file. Pids only mean something on their own host (a Kubernetes pod sharing
# the volume has its own), so only this host's leftovers are ever removed.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)@(?P<host>.*)@")

# This process's own temporaries whose removal failed after a failed write (a disk so full that even
# deleting fails, as on copy-on-write filesystems): no write of ours is using them any more, so the
# next write beside them removes them, although their pid (ours) is alive.
_ABANDONED: set[Path] = set()


def temporary_prefix(name: str) -> str:
    """The prefix of every temporary file or folder written next to `name` before its rename."""
    return f".{name}.tmp-{os.getpid()}@{socket.gethostname()}@"


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete the temporaries in `parent` whose writer, on this host, died before its rename.

    A SIGKILL or OOM between "write to a temporary name" and "rename" leaves the temporary behind.
    Every atomic write here calls this first, so leftovers go the next time anything is written
    beside them; a live writer's temporaries (another run on this machine) are never touched.
    """
    removed = []
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for leftover in parent.iterdir():
        match = _TEMPORARY.match(leftover.name)
        if not match or match["host"] != host:
            continue
        pid = int(match["pid"])
        if leftover in _ABANDONED or (pid != os.getpid() and not _pid_alive(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            if not leftover.exists():
                _ABANDONED.discard(leftover)
                removed.append(leftover)
    return removed


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _no_space_hint(error: OSError, final: Path) -> OSError:
    """ENOSPC/EDQUOT with what was being written and what to do; other errors unchanged."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    return OSError(
        error.errno,
        f"{os.strerror(error.errno)} while writing {final} (the partial copy was removed). Free space on that "
        "disk, or point CAR_MAKER_HOME at a larger one, then materialize again",
    )


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `final` (replacing it).

    An existing `final` is renamed aside before the new one takes its place, and deleted only then:
    deleting it in place would show a reader a half-deleted folder for as long as the deletion takes.
    On any failure (a full disk included) the temporary is removed; if even that fails, the next
    atomic write beside it removes it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_prefix(final.name)))
    replaced = tmp.with_name(tmp.name + "-replaced")  # named as a temporary: a crash leaves a clearable leftover
    try:
        yield tmp
        if final.exists():
            os.replace(final, replaced)
        try:
            os.replace(tmp, final)
        except OSError:
            if replaced.exists() and not final.exists():
                os.replace(replaced, final)  # the previous version stays rather than nothing
            raise
    except OSError as error:
        hinted = _no_space_hint(error, final)
        if hinted is error:
            raise
        raise hinted from error
    finally:
        for leftover in (tmp, replaced):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
            if leftover.exists():
                _ABANDONED.add(leftover)
