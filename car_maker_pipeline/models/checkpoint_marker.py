"""A checkpoint's completion marker: the size and sha256 of every file, written last, checked before use.

Training marks each checkpoint it saves (`training/checkpoints.py`); checkpoint scoring reads the
recorded adapter digest to key its cache, and recording verifies every checkpoint before scoring or
registering it. A save cut short by a crash or SIGKILL has no marker, and a file changed, truncated,
deleted or added after the save no longer matches it.

Hashing cost: every file is hashed, the optimizer state included, because resuming loads all of
them; a LoRA checkpoint holds no base weights, so even LFM2-VL-3B's is a few hundred MB at most,
and sha256 reads about 1 GB/s. The hashes are not a signature: whoever can rewrite the files can
rewrite the marker too. They catch corruption, partial copies and edits, not an attacker.

Markers written before content hashes (`"files": {name: size}`) are still accepted when every
size matches, with a warning that the checkpoint was checked by size only: their runs resume and
score as before, but a same-size change to them cannot be detected. They are not rewritten with
hashes, since nothing vouches for their current content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from car_maker_pipeline.storage import write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "trainer_state.json")
MARKER_FORMAT = 2  # 2: size and sha256 per file; markers without "format" list sizes only


def file_digest(path: Path) -> str:
    """The sha256 of a file's content, read in chunks (never whole into memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_records(folder: Path, names: list[str]) -> dict[str, dict]:
    """`{name: {"size", "sha256"}}` of files under `folder`: what a marker (or a registered version) records."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)} for name in names}


def record_problems(
    folder: Path,
    recorded: Mapping[str, dict],
    present: list[str],
    *,
    content: bool = True,
    written: str = "written",
    subject: str = "the checkpoint",
    record: str = "the completion marker",
) -> list[str]:
    """What differs between the files under `folder` and `recorded` (`file_records`), in words naming each file:
    missing, another size, another sha256 (with `content`), a path outside the folder, or `present` but not
    recorded. `written`, `subject` and `record` word the messages ("... changed after it was written")."""
    problems = []
    for name, expected in recorded.items():
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{record} lists {name!r}, a path outside {subject}")
            continue
        try:
            if not file.is_file():
                problems.append(f"{name} is missing")
                continue
            size = file.stat().st_size
            if size != expected.get("size"):
                problems.append(f"{name} has {size} bytes; {expected.get('size')} were {written}")
            elif content and "sha256" in expected and file_digest(file) != expected["sha256"]:
                problems.append(f"{name} changed after it was {written} (sha256 differs)")
        except (OSError, AttributeError) as error:
            problems.append(f"{name} cannot be checked ({type(error).__name__}: {error})")
    problems += [f"{name} was added after {subject} was {written}" for name in sorted(set(present) - set(recorded))]
    return problems


def _checkpoint_files(path: Path) -> list[str]:
    """The files a checkpoint's marker covers: everything but the marker and hidden temporaries."""
    return [
        str(p.relative_to(path))
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and p.name != CHECKPOINT_MARKER
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]


_SIZE_ONLY_WARNED: set[Path] = set()


def verify_checkpoint(path: str | os.PathLike, *, content: bool = True) -> list[str]:
    """What is wrong with a checkpoint, in words; an empty list when it is the one that was marked complete.

    `content=False` skips the hashes (marker, file list and sizes only): for a listing right after
    this process wrote the markers. Everything that reads a checkpoint to use it verifies content.
    """
    path = Path(path)
    marker = path / CHECKPOINT_MARKER
    if not path.is_dir():
        return [f"{path} does not exist"]
    if not marker.is_file():
        return ["no completion marker: the save was interrupted, or this pipeline did not write it"]
    try:
        recorded = json.loads(marker.read_text())["files"]
        if not isinstance(recorded, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"unreadable completion marker ({type(error).__name__}: {error})"]
    problems = [
        f"{name} is not listed in the completion marker" for name in CHECKPOINT_REQUIRED_FILES if name not in recorded
    ]
    # A marker from before content hashes lists {name: size}: those files are checked by size only.
    size_only = any(isinstance(expected, int) for expected in recorded.values())
    normalized = {name: {"size": v} if isinstance(v, int) else v for name, v in recorded.items()}
    if not all(isinstance(v, dict) for v in normalized.values()):
        return problems + ["unreadable completion marker (an entry is neither a size nor a record)"]
    present = recorded if size_only else _checkpoint_files(path)  # old markers are not checked for added files
    problems += record_problems(path, normalized, list(present), content=content)
    if size_only and not problems and path not in _SIZE_ONLY_WARNED:
        _SIZE_ONLY_WARNED.add(path)
        logger.warning("Checkpoint %s has a completion marker from before content hashes: checked by size only.", path)
    return problems


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint this pipeline completed and nothing changed since (see verify_checkpoint)."""
    return not verify_checkpoint(path)


def verified_checkpoints(checkpoints: Mapping[int, str | os.PathLike]) -> tuple[dict[int, Path], dict[int, list[str]]]:
    """Split checkpoints (step -> path, e.g. from the lora_checkpoints manifest) into usable ones and
    the problems of the others, so that a damaged checkpoint is never scored or registered."""
    usable, rejected = {}, {}
    for step, path in sorted(checkpoints.items()):
        problems = verify_checkpoint(path)
        if problems:
            rejected[int(step)] = problems
        else:
            usable[int(step)] = Path(path)
    return usable, rejected


def recorded_digest(path: str | os.PathLike, name: str) -> str:
    """The sha256 the completion marker records for `name` (checked by `verify_checkpoint` before use);
    hashed afresh for an old sizes-only marker, so callers never need to hash a checkpoint file again."""
    path = Path(path)
    try:
        entry = json.loads((path / CHECKPOINT_MARKER).read_text())["files"][name]
        if isinstance(entry, dict) and entry.get("sha256"):
            return entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return file_digest(path / name)


def mark_checkpoint_complete(path: Path, global_step: int) -> None:
    """Write the completion marker: size and sha256 of every file, each made durable before the marker."""
    names = _checkpoint_files(path)
    for name in names:
        with open(path / name, "rb") as handle:
            os.fsync(handle.fileno())
    files = file_records(path, names)
    write_json_atomic(path / CHECKPOINT_MARKER, {"format": MARKER_FORMAT, "global_step": global_step, "files": files})
