"""The class task's answer policy and report: how far its probabilities can be trusted, and what it answers.

Given one class-task model's predictions on validation and on test (every class's log-probability per
image, from `evaluate_split(..., task=CLASS)`), `assess_class_answers`:

- measures the probabilities on test as they are and after one temperature: top-1 and top-5 accuracy,
  log loss and the expected calibration error;
- fits that temperature on the same quarter of validation the maker task uses (`validation_folds`: folds
  by pixel hash, refusals and all) and certifies the hierarchical (class, maker) thresholds on the rest
  (`metrics/hierarchy.py`), so the guarantee is never spent on images that chose the temperature;
- applies them to test: the share answered at class level, at maker level and "unsure", and the
  precision at each level with its Wilson interval;
- adds what a buyer reads: class accuracy, the maker accuracy the class answers imply, the share with
  the right maker but the wrong model, per-class accuracy worst first, and the most-confused class pairs
  within a maker.

Plain numpy on stored predictions, like `answer_policy`: no model runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from car_maker_pipeline.data.makers import makers_for_class_names
from car_maker_pipeline.data.tasks import CLASS, Task
from car_maker_pipeline.evaluation.answer_policy import Calibration, calibrate
from car_maker_pipeline.evaluation.metrics.accuracy import (
    class_task_summary,
    confused_pairs_within_maker,
    per_class_accuracy,
)
from car_maker_pipeline.evaluation.metrics.calibration import (
    expected_calibration_error,
    log_loss,
    softmax,
    top_k_accuracy,
)
from car_maker_pipeline.evaluation.metrics.certification import check_comparisons, check_delta
from car_maker_pipeline.evaluation.metrics.hierarchy import (
    METHOD,
    ClassTree,
    climbing_curve,
    fit_thresholds,
    hierarchical_risk_coverage_png,
    level_table,
)
from car_maker_pipeline.evaluation.metrics.selective import check_target_precision
from car_maker_pipeline.evaluation.settings import DEFAULT_DELTA, DEFAULT_TARGET_PRECISION
from car_maker_pipeline.evaluation.validation_folds import split_folds
from car_maker_pipeline.storage import atomic_directory

CALIBRATION_BINS = 15
SUMMARY_FILE, LEVELS_FILE, PER_CLASS_FILE, CONFUSED_FILE, CURVE_FILE, CURVE_CHART = (
    "class_task.json",
    "levels.parquet",
    "per_class.parquet",
    "confused_pairs.parquet",
    "hierarchical_risk_coverage.parquet",
    "hierarchical_risk_coverage.png",
)
CLASS_TASK_FILES = (SUMMARY_FILE, LEVELS_FILE, PER_CLASS_FILE, CONFUSED_FILE, CURVE_FILE, CURVE_CHART)


# What this policy is called: its folders (`<run>-class_task`, `class_task-step-<n>`) and MLflow artifact path.
KIND = "class_task"


@dataclass(frozen=True)
class ClassTaskReport:
    target_precision: float
    delta: float
    comparisons: int
    temperature: float
    temperature_refused: str  # why T = 1 was kept ("" when the fit is used)
    validation_images: int
    temperature_images: int
    threshold_images: int
    test_images: int
    top1_accuracy: float  # test, from here on; top-1 is the class accuracy
    top5_accuracy: float
    log_loss: float
    ece: float
    log_loss_calibrated: float
    ece_calibrated: float
    class_accuracy_ci_low: float
    class_accuracy_ci_high: float
    implied_maker_accuracy: float  # the maker of the predicted class is the true maker
    implied_maker_accuracy_ci_low: float
    implied_maker_accuracy_ci_high: float
    right_maker_wrong_model: float
    class_threshold: float  # on the calibrated probability of the top class
    maker_threshold: float  # on the calibrated probability of the top maker (its classes summed)
    certified: bool
    class_share: float  # of the test images answered at class level
    maker_share: float
    unsure_share: float
    class_precision: float
    maker_precision: float
    answered_precision: float  # class and maker answers together: what the target is promised for
    answered_ci_low: float
    answered_ci_high: float
    statement: str
    method: str = METHOD
    val_coverage: float = float("nan")  # the share of the threshold fold answered (class or maker level)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for MLflow and Dagster metadata (the words are in `statement`)."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items() if not isinstance(value, str)}

    def to_json(self) -> dict:
        return asdict(self)

    def table_columns(self) -> dict:
        """This policy as a row of checkpoint_accuracy's table, under the maker task's columns: top-5 for top-3,
        no single best certifiable precision (the threshold pair is certified together), and what it answers
        is every class or maker answer."""
        return {
            "top5_accuracy": self.top5_accuracy,
            "log_loss": self.log_loss,
            "ece": self.ece,
            "ece_calibrated": self.ece_calibrated,
            "temperature": self.temperature,
            "certified": self.certified,
            "best_certifiable_precision": float("nan"),
            "val_coverage_at_target": self.val_coverage,
            "coverage_at_target": 1.0 - self.unsure_share,
            "selective_accuracy": self.answered_precision,
        }

    def card_fields(self) -> dict:
        """What the registered model carries of this policy (`serving.predictor.ClassifierCard` fields): the
        class threshold is the card's confidence threshold, and the maker threshold climbs below it."""
        return {
            "task": CLASS.name,
            "temperature": self.temperature,
            "confidence_threshold": self.class_threshold,
            "maker_threshold": self.maker_threshold,
            "target_precision": self.target_precision,
            "delta": self.delta,
            "certified_precision": self.target_precision if self.certified else None,
            "certification": self.statement,
        }

    @classmethod
    def from_json(cls, payload: dict) -> ClassTaskReport:
        return cls(**{field.name: payload[field.name] for field in fields(cls) if field.name in payload})

    def describe(self) -> str:
        return (
            f"class top-1 {self.top1_accuracy:.1%}, top-5 {self.top5_accuracy:.1%}, implied maker "
            f"{self.implied_maker_accuracy:.1%}; answered at class level {self.class_share:.1%}, maker level "
            f"{self.maker_share:.1%}, unsure {self.unsure_share:.1%}. {self.statement}"
        )


@dataclass(frozen=True)
class ClassTaskAssessment:
    report: ClassTaskReport
    levels: pd.DataFrame  # `hierarchy.level_table` on test
    per_class: pd.DataFrame  # worst first
    confused: pd.DataFrame  # the most-confused pairs within a maker
    curve: pd.DataFrame  # the climbing risk-coverage curve on test (calibrated)
    tree: ClassTree
    test_probabilities: np.ndarray  # calibrated
    test_truth: np.ndarray
    kind: ClassVar[str] = KIND

    def write(self, out_dir: Path, title: str) -> ClassTaskFiles:
        return write_class_report(self, out_dir, title)


def class_tree(classes: Sequence[str]) -> ClassTree:
    """The classes (the score columns, in order) under their makers."""
    return ClassTree.from_class_makers(classes, makers_for_class_names(list(classes)))


def assess_class_answers(
    validation: pd.DataFrame,
    test: pd.DataFrame,
    classes: list[str],
    target_precision: float = DEFAULT_TARGET_PRECISION,
    *,
    delta: float = DEFAULT_DELTA,
    comparisons: int = 1,
    fold_keys: Sequence[str] | None = None,
) -> ClassTaskAssessment:
    """Temperature and certified thresholds from `validation`, measured on `test` (`EvaluationRun.predictions`
    of the class task). `fold_keys`, `comparisons`: as in `answer_policy.calibrate`."""
    target_precision, delta = check_target_precision(target_precision), check_delta(delta)
    comparisons = check_comparisons(comparisons)
    tree = class_tree(classes)
    folds = split_folds(validation, test, classes, CLASS.true_column, fold_keys)
    val_log_probs, val_truth, test_log_probs, test_truth = folds.arrays()
    fitting, choice = folds.fitting, folds.temperature
    thresholds = fit_thresholds(
        softmax(val_log_probs[~fitting], choice.temperature),
        val_truth[~fitting],
        tree,
        target_precision,
        delta,
        comparisons,
    )
    raw, calibrated = softmax(test_log_probs), softmax(test_log_probs, choice.temperature)
    levels = level_table(calibrated, test_truth, tree, thresholds).set_index("level")
    predicted = [classes[i] for i in calibrated.argmax(axis=1)]
    truth_names = [classes[i] for i in test_truth]
    maker_of = dict(zip(classes, (tree.makers[i] for i in tree.maker_index)))
    buyer = class_task_summary(truth_names, predicted, maker_of)

    def calibration_error(probabilities):
        return expected_calibration_error(
            probabilities.max(axis=1), probabilities.argmax(axis=1) == test_truth, CALIBRATION_BINS
        )

    report = ClassTaskReport(
        target_precision=target_precision,
        delta=delta,
        comparisons=comparisons,
        temperature=float(choice.temperature),
        temperature_refused=choice.refused,
        validation_images=len(val_truth),
        temperature_images=int(fitting.sum()),
        threshold_images=int((~fitting).sum()),
        test_images=len(test_truth),
        top1_accuracy=buyer["class_accuracy"],
        top5_accuracy=top_k_accuracy(raw, test_truth, min(5, len(classes))),
        log_loss=log_loss(raw, test_truth),
        ece=calibration_error(raw),
        log_loss_calibrated=log_loss(calibrated, test_truth),
        ece_calibrated=calibration_error(calibrated),
        class_accuracy_ci_low=buyer["class_accuracy_ci_low"],
        class_accuracy_ci_high=buyer["class_accuracy_ci_high"],
        implied_maker_accuracy=buyer["implied_maker_accuracy"],
        implied_maker_accuracy_ci_low=buyer["implied_maker_accuracy_ci_low"],
        implied_maker_accuracy_ci_high=buyer["implied_maker_accuracy_ci_high"],
        right_maker_wrong_model=buyer["right_maker_wrong_model"],
        class_threshold=thresholds.class_threshold,
        maker_threshold=thresholds.maker_threshold,
        certified=thresholds.certified,
        class_share=float(levels.loc["class", "share"]),
        maker_share=float(levels.loc["maker", "share"]),
        unsure_share=float(levels.loc["unsure", "share"]),
        class_precision=float(levels.loc["class", "precision"]),
        maker_precision=float(levels.loc["maker", "precision"]),
        answered_precision=float(levels.loc["answered", "precision"]),
        answered_ci_low=float(levels.loc["answered", "ci_low"]),
        answered_ci_high=float(levels.loc["answered", "ci_high"]),
        statement=thresholds.statement(),
        val_coverage=(thresholds.class_answered + thresholds.maker_answered) / max(thresholds.images, 1),
    )
    return ClassTaskAssessment(
        report=report,
        levels=levels.reset_index(),
        per_class=per_class_accuracy(truth_names, predicted, classes),
        confused=confused_pairs_within_maker(truth_names, predicted, maker_of),
        curve=climbing_curve(calibrated, test_truth, tree),
        tree=tree,
        test_probabilities=calibrated,
        test_truth=test_truth,
    )


@dataclass(frozen=True)
class ClassTaskFiles:
    out_dir: str
    kind: ClassVar[str] = KIND

    def path(self, name: str) -> Path:
        return Path(self.out_dir) / name

    def report(self) -> ClassTaskReport:
        return ClassTaskReport.from_json(json.loads(self.path(SUMMARY_FILE).read_text()))

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(name))

    def artifact_paths(self) -> tuple[Path, ...]:
        """What goes to MLflow beside the numbers: every table, the report and the chart."""
        return tuple(self.path(name) for name in CLASS_TASK_FILES)


def write_class_report(assessment: ClassTaskAssessment, out_dir: Path, title: str) -> ClassTaskFiles:
    """The report, its tables (levels, per class, confused pairs, curve) and the risk-coverage chart."""
    report = assessment.report
    with atomic_directory(out_dir) as tmp:
        assessment.levels.to_parquet(tmp / LEVELS_FILE, index=False)
        assessment.per_class.to_parquet(tmp / PER_CLASS_FILE, index=False)
        assessment.confused.to_parquet(tmp / CONFUSED_FILE, index=False)
        assessment.curve.to_parquet(tmp / CURVE_FILE, index=False)
        hierarchical_risk_coverage_png(
            assessment.test_probabilities,
            assessment.test_truth,
            assessment.tree,
            tmp / CURVE_CHART,
            f"{title}: precision of the class and maker answers",
            report.target_precision,
        )
        (tmp / SUMMARY_FILE).write_text(json.dumps(report.to_json(), indent=2))
    return ClassTaskFiles(str(out_dir))


def assess_answers(
    task: Task, validation: pd.DataFrame, test: pd.DataFrame, answers: list[str], target_precision: float, **options
) -> Calibration | ClassTaskAssessment:
    """The answer policy of `task` from validation, measured on test: the maker task's temperature and threshold
    (`answer_policy.calibrate`), or the class task's hierarchical thresholds (`assess_class_answers`). Either
    result has `.report` (with `.card_fields()`) and `.write(out_dir, title)`; `options`: `delta`,
    `comparisons`, `fold_keys`."""
    policy = assess_class_answers if task == CLASS else calibrate
    return policy(validation, test, answers, target_precision, **options)
