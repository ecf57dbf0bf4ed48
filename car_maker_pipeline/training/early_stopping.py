"""Score every checkpoint on validation with the constrained classifier, and stop a run that has plateaued.

The validation loss the Trainer computes is not what the pipeline selects checkpoints by: a
checkpoint is chosen on the constrained classifier's validation accuracy (checkpoint_accuracy), so
that is what early stopping and a sweep's pruner watch too. `CheckpointValidation` scores the model
the Trainer has just saved with `MakerClassifier` on the validation split, keeps the scores per step
in the training folder (`validation_scores.json`, so a resumed run knows its history), and asks its
listeners whether to stop: `EarlyStopping` when `patience` checkpoints in a row brought no gain of at
least `min_delta`, a sweep trial when its pruner says so. The run then stops right after that
checkpoint, which is its last. Scoring restores the RNG, the model's mode and the tokenizer's padding
side, so a run with early stopping computes the very steps of one without it, until it stops.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from car_maker_pipeline.data.tasks import MAKER, Task
from car_maker_pipeline.evaluation.class_task import assess_answers
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
from car_maker_pipeline.evaluation.settings import DEFAULT_TARGET_PRECISION
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.training.checkpoints import rank

SCORES_FILE = "validation_scores.json"
EARLY_STOPPING = "early stopping"

# A listener sees (step, scores of every checkpoint so far) and returns why to stop, or None.
Listener = Callable[[int, dict[int, dict[str, float]]], str | None]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after `patience` checkpoints without a gain of at least `min_delta` (and above zero) over the
    best validation accuracy so far."""

    patience: int
    min_delta: float = 0.0
    metric: str = "val_accuracy"

    def stop_step(self, scores: dict[int, dict[str, float]]) -> int | None:
        """The step at which this rule stops a run with these per-checkpoint scores, or None."""
        best, waited = -math.inf, 0
        for step in sorted(scores):
            value = scores[step][self.metric]
            gain = value - best
            if gain > 0 and gain >= self.min_delta:
                best, waited = value, 0
                continue
            waited += 1
            if waited >= self.patience:
                return step
        return None

    def reason(self, step: int, scores: dict[int, dict[str, float]]) -> str:
        best = max(scores, key=lambda s: (scores[s][self.metric], -s))
        return (
            f"{EARLY_STOPPING}: no gain of at least {self.min_delta:g} in {self.metric} over {self.patience} "
            f"checkpoint(s); best {scores[best][self.metric]:.4f} at step {best}, stopped at step {step}"
        )

    def __call__(self, step: int, scores: dict[int, dict[str, float]]) -> str | None:
        return self.reason(step, scores) if self.stop_step(scores) == step else None


def read_scores(out: Path, up_to: int | None = None) -> dict[int, dict[str, float]]:
    path = out / SCORES_FILE
    if not path.is_file():
        return {}
    scores = {int(step): value for step, value in json.loads(path.read_text()).items()}
    return {step: value for step, value in scores.items() if up_to is None or step <= up_to}


def score_validation(
    model, processor, split, makers: Sequence[str], *, prompt=None, batch_size=16, target_precision=None, task=MAKER
) -> dict[str, float]:
    """The constrained classifier's validation accuracy and coverage at the target precision (threshold
    and temperature fitted on validation itself, as checkpoint_accuracy's `val_coverage_at_target` is)."""
    tokenizer = processor.tokenizer
    side, was_training = tokenizer.padding_side, model.training
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        model.eval()
        classifier = MakerClassifier(model, processor, makers, prompt=prompt, batch_size=batch_size)
        predictions = evaluate_split(classifier, split, task=task).predictions
        accuracy = float((predictions[task.true_column] == predictions[task.predicted_column]).mean())
        target = target_precision or DEFAULT_TARGET_PRECISION
        report = assess_answers(task, predictions, predictions, list(makers), target).report
        return {"val_accuracy": accuracy, "val_coverage_at_target": float(report.val_coverage)}
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class CheckpointValidation(TrainerCallback):
    """After each save: score the model on validation, record it, and stop when a listener says so."""

    def __init__(
        self,
        processor,
        split,
        makers: Sequence[str],
        out: Path,
        listeners: Sequence[Listener] = (),
        *,
        prompt: PromptTemplate | None = None,
        batch_size: int = 16,
        target_precision: float | None = None,
        resumed_at: int = 0,
        task: Task = MAKER,
    ):
        self.processor, self.split, self.makers, self.out = processor, split, list(makers), Path(out)
        self.listeners, self.prompt, self.batch_size = list(listeners), prompt, batch_size
        self.target_precision, self.task = target_precision, task
        self.scores = read_scores(self.out, up_to=resumed_at)  # later ones belong to checkpoints retrained now
        self.stop: dict | None = None

    def on_save(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        self.scores[step] = score_validation(
            model,
            self.processor,
            self.split,
            self.makers,
            prompt=self.prompt,
            batch_size=self.batch_size,
            target_precision=self.target_precision,
            task=self.task,
        )
        if rank() == 0:
            write_json_atomic(self.out / SCORES_FILE, {str(s): v for s, v in sorted(self.scores.items())})
        for listener in self.listeners:
            reason = listener(step, dict(self.scores))
            if reason:
                self.stop = {"step": step, "reason": reason, "max_steps": state.max_steps}
                control.should_training_stop = True
                break
        return control
