"""The batches in the additions folder: what each one is, its content fingerprint, and its rows as files.

A batch is a folder in the additions folder, or a Label Studio export (`.json`) put there by itself.
A folder holds one of three layouts:

| layout              | how it is recognised                 | a row                                               |
|---------------------|--------------------------------------|-----------------------------------------------------|
| a folder per label  | no `.csv` or `.json` file at its top | `<batch>/<label>/<image>`                           |
| CSV                 | one `.csv` file at its top           | a `path,label` line; the path relative to the CSV's folder |
| Label Studio export | one `.json` file at its top          | an exported task: its image and its one chosen label |

An optional `split.txt` holding `validation` sends the batch to the validation split (default: train).
Hidden entries (a copy under a temporary name) are ignored. Nothing is read outside the batch: a path
with `..` that climbs out, an absolute path, and a link (to a file or a folder) leading out are refused
rows, and files are read through `serving.files` (regular files only, size first, never blocking).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from car_maker_pipeline.data.decoding import TOO_LARGE, UNDECODABLE
from car_maker_pipeline.labeling import label_studio
from car_maker_pipeline.serving.files import Folder, UnreadableFile, display_name, kind
from car_maker_pipeline.serving.images import MAX_IMAGE_BYTES

OUTSIDE = "outside the batch"  # the refused-row reason for a path or link that leaves the batch folder
NO_LABEL = "no label"  # skipped, unlabeled, or labeled twice
SPLIT_FILE = "split.txt"
MAX_INDEX_BYTES = 512 * 1024 * 1024  # a CSV or an export with its images inline


class BatchError(ValueError):
    """A batch that cannot be read at all; the message names it and says what to do."""


@dataclass(frozen=True)
class Candidate:
    """One row of a batch before its label and pixels are checked: the bytes, or why there are none."""

    path: str  # as the batch names it (display form)
    label: str | None
    data: bytes | None = None
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class BatchFiles:
    name: str  # the folder's (or file's) name in the additions folder
    path: Path
    layout: str  # "folder per label", "csv" or "label studio"
    fingerprint: str  # sha256 of every file's relative path and bytes (links by their target text)
    split: str  # "train" or "validation"
    newest_mtime: float

    @property
    def batch_id(self) -> str:
        """Content only: renaming the folder keeps the id, changing any byte gives a new one."""
        return f"batch-{self.fingerprint[:12]}"


def list_batches(additions: Path, errors: list[str] | None = None) -> list[BatchFiles]:
    """Every batch in the additions folder, in name order (a missing folder holds none).

    A batch that cannot be read at all raises BatchError, or, when `errors` is given, is left out and
    its message appended there, so the others can still be ingested.
    """
    try:
        entries = sorted(os.scandir(additions), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    batches = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                batches.append(_folder_batch(Path(entry.path)))
            elif entry.name.endswith(".csv"):
                raise BatchError(
                    f"Batch {entry.name!r} is a CSV directly in the additions folder; its paths need a batch folder: "
                    "put it in a folder of its own with the images it names."
                )
            elif entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                digest = hashlib.sha256(_read_index(Path(entry.path), entry.name)).hexdigest()
                mtime = _mtime(entry.path)
                batches.append(BatchFiles(entry.name, Path(entry.path), "label studio", digest, "train", mtime))
        except BatchError as error:
            if errors is None:
                raise
            errors.append(str(error))
    return batches


def _mtime(path) -> float:
    return os.lstat(path).st_mtime


def _folder_batch(folder: Path) -> BatchFiles:
    digest, newest = hashlib.sha256(), _mtime(folder)
    for root, dirs, files in os.walk(folder):  # links are not followed; they are hashed by their text
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(dirs + files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).encode("utf-8", "surrogateescape")
            info = os.lstat(path)
            newest = max(newest, info.st_mtime)
            if stat.S_ISLNK(info.st_mode):
                digest.update(b"L" + relative + b"\0" + os.fsencode(os.readlink(path)) + b"\n")
            elif stat.S_ISREG(info.st_mode):
                digest.update(b"F" + relative + b"\0" + _file_digest(path, info) + b"\n")
            elif not stat.S_ISDIR(info.st_mode):
                digest.update(b"O" + relative + b"\0" + kind(info.st_mode).encode() + b"\n")
    top = [n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(folder / n)]
    indexes = sorted(n for n in top if n.endswith((".csv", ".json")))
    if len(indexes) > 1:
        raise BatchError(
            f"Batch {folder.name!r} holds {len(indexes)} index files {indexes}; a batch has one CSV or one "
            "Label Studio export at its top (or none, for a folder per label). Split it into several batches."
        )
    layout = "folder per label" if not indexes else ("csv" if indexes[0].endswith(".csv") else "label studio")
    return BatchFiles(folder.name, folder, layout, digest.hexdigest(), _split_of(folder), newest)


def _file_digest(path: str, info: os.stat_result) -> bytes:
    """sha256 of a regular file's bytes; for one too large to be an image or an index, of its size and time
    (it is refused unread anyway, and a change still makes a new batch)."""
    if info.st_size > MAX_INDEX_BYTES:
        return hashlib.sha256(f"{info.st_size}:{info.st_mtime_ns}".encode()).digest()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a pipe or a device since the listing
            return kind(os.fstat(fd).st_mode).encode()
        return hashlib.file_digest(handle, "sha256").digest()


def _split_of(folder: Path) -> str:
    marker = folder / SPLIT_FILE
    if not marker.is_file():
        return "train"
    value = marker.read_text(errors="replace").strip().lower()
    if value not in ("train", "validation"):
        raise BatchError(
            f"Batch {folder.name!r}: {SPLIT_FILE} says {value[:40]!r}; write 'train' or 'validation' in it, or remove it."
        )
    return value


def _read_index(path: Path, shown: str) -> bytes:
    try:
        with Folder(path.parent) as folder:
            return folder.read(path.name, limit=MAX_INDEX_BYTES)
    except (UnreadableFile, OSError) as error:
        raise BatchError(f"Batch {shown!r}: its index file {path.name!r} cannot be read: {error}") from None


def candidates(batch: BatchFiles) -> list[Candidate]:
    """Every row of the batch, with its bytes read safely, or why it has none. BatchError if unreadable as a whole."""
    if batch.layout == "folder per label":
        return _label_folders(batch)
    if batch.path.is_dir():
        index = next(n for n in sorted(os.listdir(batch.path)) if n.endswith((".csv", ".json")) and n[0] != ".")
        root, data = batch.path, _read_index(batch.path / index, batch.name)
    else:
        index, root, data = batch.name, None, _read_index(batch.path, batch.name)
    if batch.layout == "csv":
        return _csv_rows(batch.name, index, data, root)
    return _export_rows(batch.name, index, data, root)


def read_inside(root: Path, relative: str) -> bytes:
    """The bytes of `relative` inside `root`; OutsideError for a path or link leaving it, UnreadableFile else."""
    if not relative or posixpath.isabs(relative) or os.path.isabs(relative) or relative[1:3] == ":\\":
        raise OutsideError(f"an absolute path ({relative!r}); paths are relative to the batch folder")
    normal = posixpath.normpath(relative.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise OutsideError(f"{relative!r} climbs out of the batch folder with '..'")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, normal))
    if os.path.commonpath([target, real_root]) != real_root:
        raise OutsideError(f"{relative!r} leads through a symbolic link to {display_name(target)}, outside the batch")
    try:
        size = os.stat(target).st_size
    except OSError as error:
        raise UnreadableFile(f"no such file ({error.strerror})") from None
    if size > MAX_IMAGE_BYTES:
        raise TooLargeError(f"a file of {size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit for one image")
    with Folder(Path(os.path.dirname(target))) as folder:
        return folder.read(os.path.basename(target))


class OutsideError(ValueError):
    """A path that leaves the batch folder."""


class TooLargeError(ValueError):
    """A file over the size limit for one image (not read)."""


def _row(root: Path, path: str, label: str | None) -> Candidate:
    try:
        return Candidate(path, label, read_inside(root, path))
    except OutsideError as error:
        return Candidate(path, label, reason=OUTSIDE, detail=str(error))
    except TooLargeError as error:
        return Candidate(path, label, reason=TOO_LARGE, detail=str(error))
    except (UnreadableFile, OSError) as error:
        return Candidate(path, label, reason=UNDECODABLE, detail=f"cannot be read: {error}")


def _label_folders(batch: BatchFiles) -> list[Candidate]:
    rows = []
    for entry in sorted(os.scandir(batch.path), key=lambda entry: entry.name):
        name = display_name(entry.name)
        if entry.name.startswith(".") or entry.name == SPLIT_FILE:
            continue
        if entry.is_symlink():
            target = display_name(os.path.realpath(entry.path))
            rows.append(Candidate(name, None, reason=OUTSIDE, detail=f"a link to {target}; copy the files in instead"))
            continue
        if not entry.is_dir(follow_symlinks=False):
            rows.append(Candidate(name, None, reason=NO_LABEL, detail="not in a label folder"))
            continue
        for inner in sorted(os.scandir(entry.path), key=lambda inner: inner.name):
            if inner.name.startswith("."):
                continue
            relative = f"{entry.name}/{inner.name}"
            if inner.is_dir(follow_symlinks=False):
                rows.append(
                    Candidate(display_name(relative), entry.name, reason=NO_LABEL, detail="a folder in a label folder")
                )
            else:
                rows.append(_row(batch.path, relative, entry.name))
    return rows


def _csv_rows(batch: str, index: str, data: bytes, root: Path | None) -> list[Candidate]:
    if root is None:
        raise BatchError(f"Batch {batch!r} is a CSV on its own; put it in a folder with the images it names.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BatchError(f"Batch {batch!r}: {index} is not UTF-8 ({error}); save it as UTF-8.") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    missing = [name for name in ("path", "label") if name not in columns]
    if missing:
        raise BatchError(
            f"Batch {batch!r}: {index} lacks the column(s) {missing} (its header is {reader.fieldnames}); "
            "the first line must be 'path,label'."
        )
    rows = []
    for line in reader:
        path, label = (line.get(columns["path"]) or "").strip(), (line.get(columns["label"]) or "").strip()
        rows.append(
            _row(root, path, label or None) if path else Candidate("", label, reason=UNDECODABLE, detail="no path")
        )
    return rows


def _export_rows(batch: str, index: str, data: bytes, root: Path | None) -> list[Candidate]:
    try:
        tasks = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BatchError(f"Batch {batch!r}: {index} is not JSON ({error}); export the project as JSON.") from None
    if not isinstance(tasks, list):
        raise BatchError(
            f"Batch {batch!r}: {index} is not a Label Studio JSON export (a list of tasks); export the project "
            "with the 'JSON' format."
        )
    rows = []
    for row in label_studio.exported_rows(tasks):
        if row.problem:
            rows.append(Candidate(row.reference, None, reason=NO_LABEL, detail=row.problem))
        elif row.image.startswith("data:"):
            try:
                rows.append(Candidate(row.reference, row.label, label_studio.inline_bytes(row.image, MAX_IMAGE_BYTES)))
            except label_studio.InlineImageError as error:
                rows.append(Candidate(row.reference, row.label, reason=UNDECODABLE, detail=str(error)))
        elif (relative := label_studio.file_reference(row.image)) is None:
            detail = "a remote URL, not downloaded; copy the image into the batch folder"
            rows.append(Candidate(row.reference, row.label, reason=UNDECODABLE, detail=detail))
        elif root is None:
            detail = "names a file, but the export is on its own; put it in a folder with its images"
            rows.append(Candidate(row.reference, row.label, reason=OUTSIDE, detail=detail))
        else:
            rows.append(_row(root, relative, row.label))
    return rows
