"""Checkpoints of a training folder: which are complete, quarantine, where to resume.

Every `checkpoint_every_n_steps` steps (and at the last step) the HF Trainer writes
`output_dir/checkpoint-<step>`: the LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`),
the processor, optimizer, scheduler, RNG and trainer state. `CheckpointCompletionCallback` then
writes the completion marker last (`models/checkpoint_marker.py`: the size and sha256 of every
file, hashed once as the files are made durable). A checkpoint is trusted only when its folder
still holds exactly those files with those contents.

Before resuming, every checkpoint that fails verification is moved to `output_dir/quarantine/`
(with a `quarantine.json` saying why) and logged as a warning; training resumes from the newest
checkpoint that passes and retrains the span after it, ending at the same global step as an
uninterrupted run. An older damaged checkpoint is quarantined the same way and the run keeps its
later ones (retraining it would mean retraining everything after it).

The folder also keeps the settings it was started with (`lora_training_config.json`): a run resumes
only with the same hyperparameters, makers and base model, since anything else would mix two runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from car_maker_pipeline.models.checkpoint_marker import (
    mark_checkpoint_complete,
    verify_checkpoint,
)
from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError

logger = logging.getLogger(__name__)

RUN_SETTINGS_FILE = "lora_training_config.json"
QUARANTINE_DIR = "quarantine"
QUARANTINE_NOTE = "quarantine.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def check_run_settings(
    output_dir: Path, hyperparameters: LoraHyperparameters, makers: list[str], model_dir: str, *, record: bool = True
) -> None:
    """Record the folder's settings, or refuse when it holds checkpoints of a run with other maths.

    Only what changes the optimizer's computation is compared (`LoraHyperparameters.maths`): a run's
    length, early stopping and the non-mathematical settings may differ (continuation.py decides what
    another length means). A hyperparameter added to the schema after the folder was started compares
    as its default, and one no longer in the schema is ignored, so an upgrade alone never blocks a
    resume. `record=False` only checks.
    """
    wanted = {"config": hyperparameters.to_json(), "makers": list(makers), "model": str(model_dir)}
    path = output_dir / RUN_SETTINGS_FILE
    if path.is_file() and complete_checkpoints(output_dir, content=False):
        stored = json.loads(path.read_text())
        known = {k: v for k, v in stored.get("config", {}).items() if k in LoraHyperparameters.model_fields}
        stored_maths = {**LoraHyperparameters().to_json(), **known}
        mine = hyperparameters.maths()
        changed = [name for name, value in mine.items() if stored_maths.get(name) != value]
        changed += [name for name in ("makers", "model") if stored.get(name) != wanted[name]]
        if changed:
            raise LoraTrainingError(
                f"{output_dir} holds checkpoints of a run with different settings ({', '.join(changed)}). "
                "Resume with the same settings, or use a new output_dir."
            )
    if record:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, wanted)
