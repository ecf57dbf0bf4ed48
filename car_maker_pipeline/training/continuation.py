"""Continue, shorten or resume a run in its own training folder, soundly for its learning-rate schedule.

A training folder is keyed by the maths of its settings alone (`LoraHyperparameters.fingerprint`):
`max_steps`, early stopping and the non-mathematical settings do not name it. So a request with
another `max_steps` than the folder's run lands in the same folder, and `plan_run` decides what it
means there:

| request                            | what happens                                                          |
|------------------------------------|-----------------------------------------------------------------------|
| same max_steps                     | resume from the newest checkpoint, or nothing when it is finished      |
| smaller max_steps, already reached | train nothing; the checkpoints up to that step are the result          |
| smaller max_steps, not yet reached | train on (same schedule) and stop at that step                         |
| larger max_steps, extendable       | resume from the newest checkpoint whose history is also that of a run  |
|   schedule (warmup_stable_decay,   | of the new length (for WSD: taken before its decay began); the later   |
|   constant ...)                    | checkpoints move to `superseded/` and are retrained under the new one  |
| larger max_steps, linear / cosine  | refused before any work: those decay to zero over the old length       |

Why the WSD rule is exact: transformers' `warmup_stable_decay` multiplies the learning rate by the
warm-up ramp, then 1, and starts decaying only at step `max_steps - num_decay_steps`; the factor at
the first decay step is still 1. A checkpoint at or before that step therefore holds the same adapter,
optimizer moments, scheduler position and RNG as an uninterrupted run of any longer length with the
same warm-up would at that step, and resuming it under the longer schedule ends equal to that run.
The schedule length each checkpoint was trained under is its trainer state's `max_steps`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.training.checkpoints import RUN_SETTINGS_FILE, complete_checkpoints, rank
from car_maker_pipeline.training.config import EXTENDABLE_SCHEDULES, LoraHyperparameters, LoraTrainingError

logger = logging.getLogger(__name__)

SUPERSEDED_DIR = "superseded"


def recorded_hyperparameters(folder: Path) -> LoraHyperparameters | None:
    """The settings a training folder was last trained with (fields added since compare as defaults)."""
    path = folder / RUN_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text()).get("config", {})
        known = {name: value for name, value in stored.items() if name in LoraHyperparameters.model_fields}
        return LoraHyperparameters(**{**LoraHyperparameters().to_json(), **known})
    except (ValueError, TypeError):
        return None


def find_training_dir(root: Path, dataset_name: str, hyperparameters: LoraHyperparameters, num_processes: int) -> Path:
    """The folder of these settings under `root`: the one their maths names, or one an earlier release named.

    Earlier releases named folders after every setting, `max_steps` included
    (`legacy_fingerprint`); such a folder is found again when its recorded settings have the same maths
    and its name is the one that release gave them for this process count. Of several, the one trained
    for the requested length wins, else the one trained furthest.
    """
    current = root / f"{dataset_name}-{hyperparameters.fingerprint(num_processes=num_processes)}"
    if (current / RUN_SETTINGS_FILE).is_file() or not root.is_dir():
        return current
    candidates = []
    for folder in root.iterdir():
        if not folder.name.startswith(f"{dataset_name}-") or folder == current:
            continue
        stored = recorded_hyperparameters(folder)
        if stored is None or stored.same_maths(hyperparameters):
            continue
        if folder.name != f"{dataset_name}-{stored.legacy_fingerprint(num_processes=num_processes)}":
            continue
        done = complete_checkpoints(folder, content=False)
        candidates.append((stored.max_steps == hyperparameters.max_steps, max(done, default=0), folder.name, folder))
    return max(candidates)[-1] if candidates else current


def schedule_length(checkpoint: Path) -> int:
    """The `max_steps` of the schedule `checkpoint` was trained under."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["max_steps"])


@dataclass(frozen=True)
class RunPlan:
    kind: str  # new, resume, finished, shorten, continue
    resume_from: Path | None  # the checkpoint training resumes from (None: step 0)
    schedule_steps: int  # the trainer's max_steps: the schedule's length
    stop_at: int | None = None  # stop here, before the schedule ends (a shortened run not yet there)
    final_step: int | None = None  # kind shorten/finished: the step whose checkpoint is the result
    superseded: list[int] = field(default_factory=list)  # checkpoints to move aside before training
    previous_steps: int | None = None  # the folder's run length before this request

    @property
    def trains(self) -> bool:
        return self.final_step is None

    @property
    def up_to(self) -> int:
        """The last step whose checkpoint belongs to this request's run."""
        return self.final_step if self.final_step is not None else (self.stop_at or self.schedule_steps)

    def describe(self) -> str:
        start = f"step {self.resume_from.name.split('-')[-1]}" if self.resume_from else "step 0"
        if self.kind == "continue":
            return f"continued a {self.previous_steps}-step run to {self.schedule_steps} steps from {start}"
        if self.kind == "shorten":
            return f"shortened a {self.previous_steps}-step run to step {self.up_to}"
        if self.kind == "finished":
            return f"already finished at step {self.final_step}"
        return "new run" if self.kind == "new" else f"resumed from {start}"


def plan_run(out: Path, hyperparameters: LoraHyperparameters) -> RunPlan:
    """What a request for `hyperparameters.max_steps` means in `out`, given its complete checkpoints.

    Raises `LoraTrainingError` (before anything is touched) when a run whose schedule decays over its
    whole length would have to be extended.
    """
    wanted = hyperparameters.max_steps
    done = complete_checkpoints(out, content=False)
    if not done:
        return RunPlan("new", None, wanted)
    newest = max(done)
    length = schedule_length(done[newest])
    if wanted == length:
        if newest >= wanted:
            return RunPlan("finished", done[newest], wanted, final_step=newest, previous_steps=length)
        return RunPlan("resume", done[newest], wanted, previous_steps=length)
    if wanted < length:
        if newest >= wanted:
            reached = [step for step in done if step <= wanted]
            if not reached:
                raise LoraTrainingError(
                    f"{out} holds no checkpoint at or before step {wanted} (its first is step {min(done)}); "
                    f"ask for max_steps >= {min(done)}, or set fresh_start: true to train a {wanted}-step run."
                )
            return RunPlan("shorten", done[max(reached)], length, final_step=max(reached), previous_steps=length)
        return RunPlan("shorten", done[newest], length, stop_at=wanted, previous_steps=length)
    if hyperparameters.lr_scheduler_type not in EXTENDABLE_SCHEDULES:
        raise LoraTrainingError(
            f"{out} holds a run trained for {length} steps with the {hyperparameters.lr_scheduler_type!r} schedule, "
            f"which decays the learning rate to zero over those {length} steps: continuing it to {wanted} steps "
            f"would not give a {wanted}-step run. For runs you may extend use lr_scheduler_type: "
            "warmup_stable_decay (WSD: a continued run resumes before its decay and ends equal to an uninterrupted "
            f"one); or set fresh_start: true to train a separate {wanted}-step run from step 0; or keep max_steps: "
            f"{length}."
        )
    usable = [
        step
        for step, path in done.items()
        if step
        <= min(
            hyperparameters.length_independent_steps(schedule_length(path)), hyperparameters.length_independent_steps()
        )
    ]
    start = max(usable) if usable else None
    return RunPlan(
        "continue",
        done[start] if start is not None else None,
        wanted,
        superseded=[step for step in done if start is None or step > start],
        previous_steps=length,
    )


def move_superseded(out: Path, steps: list[int]) -> list[Path]:
    """Move the checkpoints of `steps` to `out/superseded/` (kept, never scored again): a continued run
    retrains their steps under its own schedule, and they must not be mistaken for its checkpoints."""
    if rank() != 0:
        return []
    moved = []
    for step in steps:
        source = out / f"checkpoint-{step}"
        if source.is_dir():
            target = out / SUPERSEDED_DIR / f"{source.name}-{int(time.time() * 1000)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            moved.append(target)
    if moved:
        write_json_atomic(out / SUPERSEDED_DIR / "superseded.json", {"moved": [str(path) for path in moved]})
    return moved


class ScheduleSaves(TrainerCallback):
    """Extra saves the plan needs: at the step the WSD decay begins (the point a later continuation resumes
    from), and at `stop_at`, where a shortened run that had not reached its end stops."""

    def __init__(self, decay_start: int | None, stop_at: int | None):
        self.decay_start, self.stop_at = decay_start, stop_at

    def on_step_end(self, args, state, control, **kwargs):
        if self.decay_start is not None and state.global_step == self.decay_start:
            control.should_save = True
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_save = True
            control.should_training_stop = True
        return control


def decay_start(hyperparameters: LoraHyperparameters, schedule_steps: int) -> int | None:
    """The step a warmup_stable_decay run of `schedule_steps` starts decaying at (None for other schedules)."""
    if hyperparameters.lr_scheduler_type != "warmup_stable_decay":
        return None
    return hyperparameters.length_independent_steps(schedule_steps)
