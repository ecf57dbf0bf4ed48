"""Image files from outside, opened only when they are what they claim to be: regular files, inside
their folder, under a size bound checked before a byte is read. Otherwise refused with the reason.

Why each rule:

| entry                                   | what reading it naively did                   | here                          |
|-----------------------------------------|-----------------------------------------------|-------------------------------|
| a named pipe (FIFO)                     | `open` waits for a writer for ever            | opened non-blocking, refused by fstat |
| `/dev/zero`, another device             | read until memory runs out (MemoryError)      | refused by fstat: not a regular file |
| a socket                                | `open` fails with ENXIO                       | refused, named as a socket    |
| a 2 GB `car.mp4`                        | read whole, then refused (2.25 GB peak RSS)   | refused from its size, unread |
| a symbolic link out of the incoming folder | the target read and classified            | refused, nothing outside read |
| a name that is not UTF-8 (`caf\\xe9.png`) | UnicodeEncodeError failed the whole batch   | listed escaped, refused: rename it |

The type and size come from `fstat` on the descriptor actually opened, so a name swapped for a pipe
between the listing and the read is still caught. Inside a folder, names are opened relative to the
folder's own descriptor without following a final link (`O_NOFOLLOW`); a link is followed only to
another regular file directly in the same folder, which is read through its own name.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from car_maker_pipeline.serving.images import MAX_IMAGE_BYTES

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnreadableFile(ValueError):
    """A file that is not read; the message says why and what to do."""


def display_name(name: str) -> str:
    """A file name as text that can be stored anywhere: undecodable bytes escaped (`caf\\xe9.png`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str | None:
    """Why a file name cannot stand for its file in a table (so the file is not classified), or None."""
    try:
        os.fsencode(name).decode("utf-8")
    except UnicodeDecodeError:
        return (
            "the file name is not valid UTF-8 (shown with its bytes escaped), so no table row could name it; "
            "rename the file"
        )
    return None


def kind(mode: int) -> str:
    return next((label for test, label in _KINDS if test(mode)), "not a regular file")


def _refusal(what: str) -> UnreadableFile:
    return UnreadableFile(f"{what}, not a regular file; only regular image files are read")


def _read_open(fd: int, limit: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _refusal(kind(info.st_mode))
    if info.st_size > limit:
        raise UnreadableFile(f"file of {info.st_size:,} bytes is over the {limit:,}-byte limit for one image")
    # One read of the whole file (a regular file gives it at once), so it is never held twice while joined.
    parts = [os.read(fd, info.st_size + 1)]
    total = len(parts[0])
    while total <= limit and (more := os.read(fd, limit + 1 - total)):  # it grew since fstat
        parts.append(more)
        total += len(more)
    if total > limit:
        raise UnreadableFile(f"file grew past the {limit:,}-byte limit for one image while it was read")
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Link(Exception):
    """The name opened without following links is a symbolic link."""


def _open(path, flags: int, dir_fd: int | None) -> int:
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP and flags & os.O_NOFOLLOW:
            raise _Link from None
        if error.errno == errno.ENXIO:  # opening a socket
            raise _refusal("a socket") from None
        if error.errno == errno.ENOENT:
            raise UnreadableFile("no such file (it was removed, or is a link to nothing)") from None
        raise UnreadableFile(f"cannot open the file ({type(error).__name__}: {error.strerror or error})") from None


def read_file(path: str | os.PathLike, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the regular file at `path` (a link to one is followed: the caller named it)."""
    return _read_and_close(_open(path, _OPEN_FLAGS, None), limit)


def _read_and_close(fd: int, limit: int) -> bytes:
    try:
        return _read_open(fd, limit)
    except OSError as error:
        raise UnreadableFile(f"cannot read the file ({type(error).__name__}: {error.strerror or error})") from None
    finally:
        os.close(fd)


class Folder:
    """A folder of incoming files, opened once: its entries are read relative to it, never outside it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.real = os.path.realpath(self.path)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
        """The bytes of the regular file `name` in this folder, or UnreadableFile saying why not."""
        problem = name_problem(name)
        if problem:
            raise UnreadableFile(problem)
        if "/" in name or name in (".", ".."):
            raise UnreadableFile(f"{display_name(name)!r} is not the name of a file in this folder")
        try:
            fd = _open(name, _OPEN_FLAGS | os.O_NOFOLLOW, self.fd)
        except _Link:
            try:
                fd = _open(self._link_target(name), _OPEN_FLAGS | os.O_NOFOLLOW, self.fd)
            except _Link:  # replaced by another link since: not followed twice
                raise UnreadableFile("a symbolic link that changed while it was read; try again") from None
        return _read_and_close(fd, limit)

    def _link_target(self, name: str) -> str:
        """The name, in this folder, of the regular file the link `name` leads to; refused if it leads elsewhere."""
        target = os.readlink(name, dir_fd=self.fd)
        resolved = os.path.realpath(os.path.join(self.real, target))
        shown = display_name(os.fsdecode(target))
        if os.path.dirname(resolved) == self.real and resolved != self.real:
            if os.path.basename(resolved).startswith("."):  # hidden: a copy that may still be in progress
                raise UnreadableFile(f"a symbolic link to the hidden file {shown}, which is not read (yet)")
            return os.path.basename(resolved)
        if os.path.commonpath([resolved, self.real]) == self.real:
            raise UnreadableFile(
                f"a symbolic link to {shown}, which is in a subfolder, not a file directly in this folder; "
                "move the file into the folder itself"
            )
        raise UnreadableFile(
            f"a symbolic link to {shown}, which is outside this folder; nothing outside the folder is read: "
            "copy the file in instead"
        )
