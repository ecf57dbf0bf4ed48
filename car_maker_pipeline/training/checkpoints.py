"""Checkpoints of a training folder: completion markers, quarantine of unusable ones, and where to resume.

Every `checkpoint_every_n_steps` steps (and at the last step) the HF Trainer writes
`output_dir/checkpoint-<step>`: the LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`),
the processor, optimizer, scheduler, RNG and trainer state. `CheckpointCompletionCallback` then
writes `checkpoint_complete.json` (file names and sizes) last, so a checkpoint cut short by a crash
or SIGKILL is recognisable: the next run moves incomplete checkpoints to `output_dir/incomplete/`
and resumes from the newest complete one, ending at the same global step as an uninterrupted run.

The folder also keeps the settings it was started with (`lora_training_config.json`): a run resumes
only with the same hyperparameters, makers and base model, since anything else would mix two runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"
CHECKPOINT_REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json")
RUN_SETTINGS_FILE = "lora_training_config.json"
INCOMPLETE_DIR = "incomplete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint is complete when its marker exists and every file it lists has the recorded size."""
    path = Path(path)
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file() or not all((path / f).is_file() for f in CHECKPOINT_REQUIRED_FILES):
        return False
    try:
        files = json.loads(marker.read_text())["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


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


def complete_checkpoints(output_dir: str | os.PathLike) -> dict[int, Path]:
    return {step: path for step, path in list_checkpoints(output_dir).items() if is_complete_checkpoint(path)}


def quarantine_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Move every incomplete `checkpoint-*` folder to `output_dir/incomplete/`; returns the new paths."""
    out = Path(output_dir)
    moved = []
    for _step, path in list_checkpoints(out).items():
        if is_complete_checkpoint(path):
            continue
        target = out / INCOMPLETE_DIR / f"{path.name}-{int(time.time() * 1000)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        logger.warning("Checkpoint %s is incomplete (interrupted save); moved it to %s", path, target)
        moved.append(target)
    return moved


def mark_checkpoint_complete(path: Path, global_step: int) -> None:
    files = {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_MARKER and not p.name.startswith(".")
    }
    for name in files:  # make the data durable before the marker says it is there
        with open(path / name, "rb") as handle:
            os.fsync(handle.fileno())
    write_json_atomic(path / CHECKPOINT_MARKER, {"global_step": global_step, "files": files})


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


def resume_point(output_dir: Path) -> Path | None:
    """The newest complete checkpoint to resume from, after moving unusable ones aside (rank 0 only)."""
    if rank() == 0:  # under accelerate/torchrun every process gets here; one moves folders
        quarantine_incomplete_checkpoints(output_dir)
    done = complete_checkpoints(output_dir)
    return done[max(done)] if done else None


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
    if path.is_file() and complete_checkpoints(output_dir):
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
