"""Score every LoRA checkpoint of one training run with the baseline's evaluator.

The base model is loaded once; each checkpoint's adapter is attached under its own name (PEFT holds
them side by side), and each split is read once: every batch of pictures is prepared once and run
through every checkpoint's adapter in turn (`set_adapter`), so 8 checkpoints cost one preparation of
the pictures, not 8. `disable_adapter()` gives back the base model for robustness comparisons.
Results are cached per (checkpoint, split), so re-materializing only evaluates new checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from car_maker_pipeline.data.tasks import MAKER, Task
from car_maker_pipeline.evaluation.answer_policy import Calibration
from car_maker_pipeline.evaluation.class_task import ClassTaskAssessment, assess_answers
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier
from car_maker_pipeline.evaluation.settings import (
    DEFAULT_DELTA,
    DEFAULT_PREFETCH,
    DEFAULT_SELECTION_METRIC,
    DEFAULT_TARGET_PRECISION,
    SELECTION_METRICS,
)
from car_maker_pipeline.evaluation.split_report import (
    EvaluationReport,
    ReportTarget,
    evaluate_each_to_dir,
    evaluate_to_dir,
)
from car_maker_pipeline.evaluation.validation_folds import fold_keys
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.checkpoint_marker import ADAPTER_WEIGHTS, recorded_digest

VALIDATION, TEST = "validation", "test"
# Part of every cached result's name: results written before every maker's probability was scored
# (or scored another way) are not reused.
SCORING = "all-makers-v1"


THROUGHPUT_COLUMNS = ("image_tokens_mean", "image_tokens_p95", "padded_to_real_tokens", "forward_passes_per_image")


class CheckpointEvaluationError(ValueError):
    """Checkpoints that cannot be evaluated."""


@dataclass
class CheckpointScores:
    table: pd.DataFrame  # one row per step: val/test accuracy, CI, macro, change vs baseline, val loss
    best_step: int
    best_checkpoint: Path
    robustness: pd.DataFrame  # one row per corrupted split: baseline vs best checkpoint
    reports: dict[tuple[int | str, str], EvaluationReport]
    calibrations: dict[int, Calibration]  # per step: temperature and threshold from validation, on test

    @property
    def best(self) -> pd.Series:
        """The chosen checkpoint's row of `table`."""
        return self.table.set_index("step").loc[self.best_step]


def _cached_or_evaluate(
    classifier, dataset, split, out_dir: Path, title: str, figures: bool, task: Task
) -> EvaluationReport:
    summary = out_dir / "summary.json"
    if summary.exists():
        return EvaluationReport.from_json(json.loads(summary.read_text()))
    return evaluate_to_dir(classifier, dataset, split, out_dir, title=title, figures=figures, task=task)


def _every_checkpoint(classifier, dataset, split: str, step_dirs: dict[int, Path], task: Task) -> dict:
    """Every checkpoint's report on `split`: cached ones read back, the others scored together in one
    pass over the pictures (each prepared once, then run through every checkpoint's adapter)."""
    reports, missing = {}, []
    for step in sorted(step_dirs):
        summary = step_dirs[step] / split / "summary.json"
        if summary.exists():
            reports[(step, split)] = EvaluationReport.from_json(json.loads(summary.read_text()))
        else:
            missing.append(ReportTarget(f"step-{step}", step_dirs[step] / split, f"step {step} {split}", split == TEST))
    if missing:
        for target, report in zip(missing, evaluate_each_to_dir(classifier, dataset, split, missing, task)):
            reports[(int(target.adapter.removeprefix("step-")), split)] = report
    return reports


def results_dir(out_root: Path, label: str, budget: ImageTokenBudget, adapter: Path | None = None) -> Path:
    """Where one evaluation's results are cached: named after what decides them besides the data.

    The adapter's bytes (a checkpoint retrained after quarantine keeps its step number but not its
    weights) and the image-token budget (other pictures, other scores) are part of the name, so a
    cached result is reused only for the very same adapter and budget.
    """
    digest = hashlib.sha256(json.dumps({**budget.to_json(), "scoring": SCORING}, sort_keys=True).encode())
    if adapter is not None:
        digest.update(recorded_digest(adapter, ADAPTER_WEIGHTS).encode())
    return out_root / f"{label}-{digest.hexdigest()[:10]}"


def attach_adapters(base_model, checkpoints: dict[int, Path]):
    """A PeftModel holding one adapter per checkpoint, named `step-<n>`."""
    from car_maker_pipeline.models.loading import attach_adapter

    steps = sorted(checkpoints)
    model = attach_adapter(base_model, checkpoints[steps[0]], adapter_name=f"step-{steps[0]}")
    for step in steps[1:]:
        attach_adapter(model, checkpoints[step], adapter_name=f"step-{step}")
    model.eval()
    return model


def score_checkpoints(
    base_model,
    processor,
    checkpoints: dict[int, Path],
    dataset,
    makers: list[str],
    out_root: Path,
    baseline_accuracy: float | None,
    val_loss: dict[int, float] | None = None,
    prompt: PromptTemplate | None = None,
    batch_size: int = 16,
    prepare_workers: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    corrupted_splits: list[str] | None = None,
    budget: ImageTokenBudget | None = None,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    selection_metric: str = DEFAULT_SELECTION_METRIC,
    delta: float = DEFAULT_DELTA,
    task: Task = MAKER,
) -> CheckpointScores:
    """Every checkpoint scored on validation and test, its temperature and threshold chosen on validation, and
    the best chosen on validation by `selection_metric`. For the class task `makers` are the class names, each
    step's policy is `class_task.assess_class_answers` (the hierarchical thresholds) and accuracy is class accuracy.

    The same validation images both choose the checkpoint and certify its threshold, so each checkpoint is
    certified at delta / (number of checkpoints): whichever is chosen, its promise fails with probability at
    most delta (Bonferroni). A checkpoint's `val_coverage_at_target` is its certified coverage (0 when the
    target cannot be certified).
    """
    if not checkpoints:
        raise CheckpointEvaluationError(
            "There are no complete checkpoints to evaluate; materialize lora_checkpoints first."
        )
    model = attach_adapters(base_model, checkpoints)
    classifier = MakerClassifier(
        model, processor, makers, prompt=prompt, batch_size=batch_size, budget=budget, workers=prepare_workers,
        prefetch=prefetch,
    )  # fmt: skip
    reports: dict[tuple[int | str, str], EvaluationReport] = {}
    step_dirs = {
        step: results_dir(out_root, f"step-{step}", classifier.budget, path) for step, path in checkpoints.items()
    }
    for split in (VALIDATION, TEST):
        reports.update(_every_checkpoint(classifier, dataset, split, step_dirs, task))
    rows = []
    calibrations: dict[int, Calibration | ClassTaskAssessment] = {}
    for step in sorted(checkpoints):
        val, test = reports[(step, VALIDATION)].summary, reports[(step, TEST)].summary
        val_predictions = reports[(step, VALIDATION)].predictions()
        calibrations[step] = assess_answers(
            task,
            val_predictions,
            reports[(step, TEST)].predictions(),
            makers,
            target_precision,
            delta=delta,
            comparisons=len(checkpoints),
            fold_keys=fold_keys(dataset[VALIDATION], val_predictions),
        )
        rows.append(
            {
                "step": step,
                "val_accuracy": val.accuracy,
                "accuracy": test.accuracy,
                "ci_low": test.ci_low,
                "ci_high": test.ci_high,
                "macro_accuracy": test.macro_accuracy,
                "change_vs_baseline": test.accuracy - baseline_accuracy
                if baseline_accuracy is not None
                else float("nan"),
                "val_loss": (val_loss or {}).get(step, float("nan")),
                **calibrations[step].report.table_columns(),
                # What the test evaluation computed: tokens per image, padding waste, forward passes.
                **{key: reports[(step, TEST)].throughput.get(key, float("nan")) for key in THROUGHPUT_COLUMNS},
            }
        )
    table = pd.DataFrame(rows)
    if selection_metric not in SELECTION_METRICS:
        raise CheckpointEvaluationError(
            f"Unknown selection metric {selection_metric!r}; use one of {', '.join(SELECTION_METRICS)}."
        )
    # Chosen on validation, never on test; ties go to the lower validation loss, then the later step.
    ranked = table.assign(_loss=table["val_loss"].fillna(float("inf"))).sort_values(
        [selection_metric, "val_accuracy", "_loss", "step"], ascending=[False, False, True, False]
    )
    best_step = int(ranked.iloc[0]["step"])

    robustness_rows = []
    for split in corrupted_splits or []:
        with model.disable_adapter():
            base = _cached_or_evaluate(
                classifier,
                dataset,
                split,
                results_dir(out_root, "base", classifier.budget) / split,
                f"base {split}",
                figures=False,
                task=task,
            )
        model.set_adapter(f"step-{best_step}")
        tuned = _cached_or_evaluate(
            classifier,
            dataset,
            split,
            step_dirs[best_step] / split,
            f"step {best_step} {split}",
            figures=False,
            task=task,
        )
        reports[("base", split)], reports[(best_step, split)] = base, tuned
        robustness_rows.append(
            {
                "corruption": split,
                "baseline_accuracy": base.summary.accuracy,
                "best_checkpoint_accuracy": tuned.summary.accuracy,
                "best_ci_low": tuned.summary.ci_low,
                "best_ci_high": tuned.summary.ci_high,
            }
        )
    robustness = pd.DataFrame(
        robustness_rows,
        columns=["corruption", "baseline_accuracy", "best_checkpoint_accuracy", "best_ci_low", "best_ci_high"],
    )
    return CheckpointScores(table, best_step, checkpoints[best_step], robustness, reports, calibrations)


def accuracy_chart(table: pd.DataFrame, baseline_accuracy: float | None, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(table["step"], table["accuracy"], marker="o", label="test accuracy")
    axis.fill_between(table["step"], table["ci_low"], table["ci_high"], alpha=0.2, label="95% CI")
    axis.plot(table["step"], table["val_accuracy"], marker="s", linestyle="--", label="validation accuracy")
    if baseline_accuracy is not None:
        axis.axhline(baseline_accuracy, color="grey", linestyle=":", label="baseline (test)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.02)
    if table["val_loss"].notna().any():
        loss_axis = axis.twinx()
        loss_axis.plot(table["step"], table["val_loss"], color="tab:red", marker="x", label="validation loss")
        loss_axis.set_ylabel("validation loss", color="tab:red")
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    return figure
