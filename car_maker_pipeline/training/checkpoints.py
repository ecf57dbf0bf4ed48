"""Checkpoints of a training folder: completion markers that bind content, quarantine, where to resume.

Every `checkpoint_every_n_steps` steps (and at the last step) the HF Trainer writes
`output_dir/checkpoint-<step>`: the LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`),
the processor, optimizer, scheduler, RNG and trainer state. `CheckpointCompletionCallback` then
writes `checkpoint_complete.json` last: the size and sha256 of every file, hashed once, as the
files are made durable. A checkpoint is trusted only when its folder still holds exactly those
files with those contents (`verify_checkpoint`): a save cut short by a crash or SIGKILL has no
marker, and a file changed, truncated, deleted or added after the save no longer matches it.

Before resuming, every checkpoint that fails verification is moved to `output_dir/quarantine/`
(with a `quarantine.json` saying why) and logged as a warning; training resumes from the newest
checkpoint that passes and retrains the span after it, ending at the same global step as an
uninterrupted run. An older damaged checkpoint is quarantined the same way and the run keeps its
later ones (retraining it would mean retraining everything after it). Checkpoint scoring calls
`verified_checkpoints` so that a checkpoint damaged after training is never scored or registered.

Hashing cost: every file is hashed, the optimizer state included, because resuming loads all of
them; a LoRA checkpoint holds no base weights, so even LFM2-VL-3B's is a few hundred MB at most,
and sha256 reads about 1 GB/s. The hashes are not a signature: whoever can rewrite the files can
rewrite the marker too. They catch corruption, partial copies and edits, not an attacker.

Markers written before content hashes (`"files": {name: size}`) are still accepted when every
size matches, with a warning that the checkpoint was checked by size only: their runs resume and
score as before, but a same-size change to them cannot be detected. They are not rewritten with
hashes, since nothing vouches for their current content.

The folder also keeps the settings it was started with (`lora_training_config.json`): a run resumes
only with the same hyperparameters, makers and base model, since anything else would mix two runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"
CHECKPOINT_REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json")
MARKER_FORMAT = 2  # 2: size and sha256 per file; markers without "format" list sizes only
RUN_SETTINGS_FILE = "lora_training_config.json"
QUARANTINE_DIR = "quarantine"
QUARANTINE_NOTE = "quarantine.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
    size_only = False
    for name, expected in recorded.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"the completion marker lists {name!r}, a path outside the checkpoint")
            continue
        if isinstance(expected, int):  # a marker from before content hashes: {name: size}
            expected, size_only = {"size": expected}, True
        try:
            if not file.is_file():
                problems.append(f"{name} is missing")
                continue
            size = file.stat().st_size
            if size != expected.get("size"):
                problems.append(f"{name} has {size} bytes; {expected.get('size')} were written")
            elif content and "sha256" in expected and _digest(file) != expected["sha256"]:
                problems.append(f"{name} changed after it was written (sha256 differs)")
        except (OSError, AttributeError) as error:
            problems.append(f"{name} cannot be checked ({type(error).__name__}: {error})")
    if size_only:
        if not problems and path not in _SIZE_ONLY_WARNED:
            _SIZE_ONLY_WARNED.add(path)
            logger.warning(
                "Checkpoint %s has a completion marker from before content hashes: checked by size only.", path
            )
    else:
        added = sorted(set(_checkpoint_files(path)) - set(recorded))
        problems += [f"{name} was added after the checkpoint was written" for name in added]
    return problems


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint this pipeline completed and nothing changed since (see verify_checkpoint)."""
    return not verify_checkpoint(path)


def list_checkpoints(output_dir: str | os.PathLike) -> dict[int, Path]:
    """Every `checkpoint-<step>` folder of a training folder, complete or not, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return {}
    found = {}
    for child in out.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def complete_checkpoints(output_dir: str | os.PathLike, *, content: bool = True) -> dict[int, Path]:
    """The checkpoints of a training folder that pass `verify_checkpoint`, by step."""
    return {
        step: path
        for step, path in list_checkpoints(output_dir).items()
        if not verify_checkpoint(path, content=content)
    }


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


@dataclass(frozen=True)
class QuarantinedCheckpoint:
    step: int
    moved_to: Path
    problems: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "moved_to": str(self.moved_to), "problems": list(self.problems)}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> QuarantinedCheckpoint:
        return cls(int(payload["step"]), Path(payload["moved_to"]), list(payload["problems"]))


def quarantine_unusable_checkpoints(output_dir: str | os.PathLike) -> list[QuarantinedCheckpoint]:
    """Move every checkpoint that fails verification to `output_dir/quarantine/`, saying why in the log
    and in a `quarantine.json` beside its files; returns what was moved."""
    out = Path(output_dir)
    moved = []
    for step, path in list_checkpoints(out).items():
        problems = verify_checkpoint(path)
        if not problems:
            continue
        target = out / QUARANTINE_DIR / f"{path.name}-{int(time.time() * 1000)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        write_json_atomic(target / QUARANTINE_NOTE, {"step": step, "problems": problems})
        logger.warning(
            "Checkpoint %s cannot be trusted (%s); moved it to %s. Training resumes from the newest checkpoint "
            "that passes verification and retrains the steps after it.",
            path,
            "; ".join(problems),
            target,
        )
        moved.append(QuarantinedCheckpoint(step, target, problems))
    return moved


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
    return _digest(path / name)


def mark_checkpoint_complete(path: Path, global_step: int) -> None:
    """Write the completion marker: size and sha256 of every file, each made durable before the marker."""
    files = {}
    for name in _checkpoint_files(path):
        with open(path / name, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            os.fsync(handle.fileno())
        files[name] = {"size": (path / name).stat().st_size, "sha256": digest}
    write_json_atomic(path / CHECKPOINT_MARKER, {"format": MARKER_FORMAT, "global_step": global_step, "files": files})


class CheckpointCompletionCallback(TrainerCallback):
    """Runs after the Trainer has written a checkpoint (trainer_state.json last): mark it complete."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # under DDP every rank writes its rng_state_<rank>.pth: all done before the marker
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                mark_checkpoint_complete(path, state.global_step)
        return control


def rank() -> int:
    """This process's global rank under accelerate/torchrun; 0 when training in one process."""
    return int(os.environ.get("RANK", "0"))


def resume_point(output_dir: Path) -> tuple[Path | None, list[QuarantinedCheckpoint]]:
    """The newest verified checkpoint to resume from, and the unusable ones moved aside (by rank 0 only).

    Every rank verifies on its own and reaches the same answer from the same files, so all
    processes of a distributed run resume from the same step.
    """
    if rank() == 0:
        quarantined = quarantine_unusable_checkpoints(output_dir)
        done = list_checkpoints(output_dir)  # what is left has just passed verification: no second hashing
    else:
        quarantined, done = [], complete_checkpoints(output_dir)
    return (done[max(done)] if done else None), quarantined


def finished_state(checkpoint: Path | None) -> dict[str, Any] | None:
    """The trainer state of `checkpoint` when it is the last step of its run, else None."""
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state if state.get("max_steps", -1) > 0 and state["global_step"] >= state["max_steps"] else None


def check_run_settings(
    output_dir: Path, hyperparameters: LoraHyperparameters, makers: list[str], model_dir: str
) -> None:
    """Record the folder's settings, or refuse when it holds checkpoints of a run with other settings.

    A hyperparameter added to the schema after the folder was started compares as its default, and
    one no longer in the schema is ignored, so an upgrade alone never blocks a resume.
    """
    wanted = {"config": hyperparameters.to_json(), "makers": list(makers), "model": str(model_dir)}
    path = output_dir / RUN_SETTINGS_FILE
    if path.is_file() and complete_checkpoints(output_dir, content=False):
        stored = json.loads(path.read_text())
        defaults = LoraHyperparameters().to_json()
        stored_config = {**defaults, **stored.get("config", {})}
        changed = [name for name, value in wanted["config"].items() if stored_config.get(name) != value]
        changed += [name for name in ("makers", "model") if stored.get(name) != wanted[name]]
        if changed:
            raise LoraTrainingError(
                f"{output_dir} holds checkpoints of a run with different settings ({', '.join(changed)}). "
                "Resume with the same settings, or use a new output_dir."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, wanted)
