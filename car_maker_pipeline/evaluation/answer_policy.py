"""How far an evaluation's probabilities can be trusted, and where the classifier should say "unsure".

Given the predictions of one model on validation and on test (every maker's log-probability per
image, from `MakerClassifier`), `calibrate`:

- measures the probabilities on test as they are: top-1, top-3 and macro accuracy, log loss and the
  expected calibration error over 15 bins;
- splits validation in two folds by each image's pixel hash (`validation_folds`, shared with the class
  task's policy): a quarter fits one temperature, the rest
  certifies the threshold, so the threshold's guarantee is never spent on images that chose the
  temperature (the cost: that quarter of validation does not count towards the certificate);
- fits the temperature on its fold, or refuses it and keeps T = 1, naming why, when the fit says
  nothing about a scale: a fold the model gets entirely right (or entirely wrong), one maker only, or
  a fit on the search range's bound;
- certifies on the other fold the confidence threshold for the target precision with Learn then Test
  (`metrics/certification.py`): with probability at least 1 - delta, precision on new images is at least
  the target. When the fold cannot certify the target, the threshold lies above every probability, every
  answer is "unsure", and the report says so in words, with the images needed and the best precision the
  fold does certify;
- applies the threshold to test: the share answered (coverage) and the accuracy reached there, with its
  95% Wilson interval.

The temperature and threshold are what the registered model carries, so the served model abstains
exactly as measured here. Plain numpy on stored predictions: no model runs, nothing is cached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import pandas as pd

from car_maker_pipeline.evaluation.metrics.calibration import (
    expected_calibration_error,
    log_loss,
    probability_metrics,
    reliability_bins,
    reliability_diagram_png,
    softmax,
)
from car_maker_pipeline.evaluation.metrics.certification import (
    METHOD,
    certify_threshold,
    check_comparisons,
    check_delta,
)
from car_maker_pipeline.evaluation.metrics.selective import (
    apply_threshold,
    check_target_precision,
    risk_coverage,
    risk_coverage_png,
)
from car_maker_pipeline.evaluation.settings import DEFAULT_DELTA, DEFAULT_TARGET_PRECISION
from car_maker_pipeline.evaluation.validation_folds import split_folds
from car_maker_pipeline.storage import atomic_directory

CALIBRATION_BINS = 15
RISK_COVERAGE_FILE, RELIABILITY_FILE, RISK_COVERAGE_CHART, SUMMARY_FILE = (
    "risk_coverage.parquet",
    "reliability_diagram.png",
    "risk_coverage.png",
    "calibration.json",
)


# What this policy is called: its folders (`<run>-calibration`, `calibration-step-<n>`) and MLflow artifact path.
KIND = "calibration"


@dataclass(frozen=True)
class CalibrationReport:
    target_precision: float
    delta: float  # the chance that the promise fails
    comparisons: int  # models compared on the same validation images (checkpoints): delta is shared by them
    temperature: float
    temperature_fitted: float  # NaN when no fit was tried
    temperature_refused: str  # why T = 1 was kept ("" when the fit is used)
    validation_images: int
    temperature_images: int  # the validation images that fitted the temperature (the cost of the two folds)
    threshold_images: int  # the validation images that certified the threshold
    top1_accuracy: float  # test, from here on
    top3_accuracy: float
    macro_accuracy: float
    log_loss: float
    ece: float
    log_loss_calibrated: float
    ece_calibrated: float
    threshold: float  # on the calibrated probability of the top maker; answer "unsure" below it
    certified: bool  # False: the target cannot be certified on validation, so nothing is answered
    certified_precision: float  # the promised lower bound on precision (the target); NaN when not certified
    best_certifiable_precision: float  # the highest target the threshold fold certifies
    images_needed: float  # answered threshold-fold images without error that the target needs at the least
    val_answered: int  # threshold-fold images answered at the threshold
    val_errors: int
    val_coverage: float  # the certified coverage: val_answered / threshold_images
    coverage: float
    selective_accuracy: float  # on the answered test images (NaN when none)
    selective_ci_low: float
    selective_ci_high: float
    answered: int
    test_images: int
    statement: str  # what the threshold promises, in words
    method: str = METHOD

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for MLflow and Dagster metadata (the words are in `statement`)."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items() if not isinstance(value, str)}

    def to_json(self) -> dict:
        return asdict(self)

    def table_columns(self) -> dict:
        """This policy as a row of checkpoint_accuracy's table (the class task's report gives the same columns)."""
        return {
            "top3_accuracy": self.top3_accuracy,
            "log_loss": self.log_loss,
            "ece": self.ece,
            "ece_calibrated": self.ece_calibrated,
            "temperature": self.temperature,
            "certified": self.certified,
            "best_certifiable_precision": self.best_certifiable_precision,
            "val_coverage_at_target": self.val_coverage,
            "coverage_at_target": self.coverage,
            "selective_accuracy": self.selective_accuracy,
        }

    def card_fields(self) -> dict:
        """What the registered model carries of this policy (`serving.predictor.ClassifierCard` fields)."""
        return {
            "temperature": self.temperature,
            "confidence_threshold": self.threshold,
            "target_precision": self.target_precision,
            "delta": self.delta,
            "certified_precision": None if math.isnan(self.certified_precision) else self.certified_precision,
            "certification": self.statement,
        }

    def describe(self) -> str:
        answered = (
            f"coverage {self.coverage:.1%}, accuracy {self.selective_accuracy:.1%} "
            f"[{self.selective_ci_low:.1%}, {self.selective_ci_high:.1%}]"
            if self.answered
            else "nothing answered"
        )
        return (
            f"top-1 {self.top1_accuracy:.1%}, top-3 {self.top3_accuracy:.1%}, ECE {self.ece:.3f} -> "
            f"{self.ece_calibrated:.3f} at T={self.temperature:.2f}; on test: {answered}. {self.statement}"
        )

    @classmethod
    def from_json(cls, payload: dict) -> CalibrationReport:
        return cls(**{field.name: payload[field.name] for field in fields(cls) if field.name in payload})


@dataclass(frozen=True)
class Calibration:
    report: CalibrationReport
    curve: pd.DataFrame  # risk-coverage on test (calibrated confidence)
    val_curve: pd.DataFrame  # on the threshold fold
    bins: pd.DataFrame  # reliability on test, before temperature
    bins_calibrated: pd.DataFrame
    kind: ClassVar[str] = KIND

    def write(self, out_dir: Path, title: str) -> CalibrationFiles:
        return write_calibration(self, out_dir, title)


def calibrate(
    validation: pd.DataFrame,
    test: pd.DataFrame,
    makers: list[str],
    target_precision: float = DEFAULT_TARGET_PRECISION,
    *,
    delta: float = DEFAULT_DELTA,
    comparisons: int = 1,
    fold_keys: Sequence[str] | None = None,
    true_column: str = "true_maker",
) -> Calibration:
    """Temperature and certified threshold from `validation`, measured on `test` (both `EvaluationRun.predictions`).

    `fold_keys`: one key per validation row (its pixel hash) deciding its fold; without them, the rows'
    `index` (or position). `comparisons`: the models compared on the same validation images (see the module docstring).
    `true_column`: "true_class" for a class-task evaluation scored flat (its early-stopping scores).
    """
    target_precision, delta = check_target_precision(target_precision), check_delta(delta)
    comparisons = check_comparisons(comparisons)
    folds = split_folds(validation, test, makers, true_column, fold_keys)
    val_log_probs, val_truth, test_log_probs, test_truth = folds.arrays()
    fitting, choice = folds.fitting, folds.temperature
    probabilities = softmax(test_log_probs)
    raw = probability_metrics(probabilities, test_truth, bins=CALIBRATION_BINS)

    def confidence_and_correct(log_probs, truth):
        calibrated = softmax(log_probs, choice.temperature)
        return calibrated.max(axis=1), calibrated.argmax(axis=1) == truth, calibrated

    val_confidence, val_correct, _ = confidence_and_correct(val_log_probs[~fitting], val_truth[~fitting])
    confidence, correct, calibrated = confidence_and_correct(test_log_probs, test_truth)
    certificate = certify_threshold(val_confidence, val_correct, target_precision, delta, comparisons)
    on_test = apply_threshold(confidence, correct, certificate.threshold)
    report = CalibrationReport(
        target_precision=target_precision,
        delta=delta,
        comparisons=comparisons,
        temperature=float(choice.temperature),
        temperature_fitted=float(choice.fitted),
        temperature_refused=choice.refused,
        validation_images=len(val_truth),
        temperature_images=int(fitting.sum()),
        threshold_images=int((~fitting).sum()),
        top1_accuracy=raw.top1,
        top3_accuracy=raw.top3,
        macro_accuracy=raw.macro_accuracy,
        log_loss=raw.log_loss,
        ece=raw.ece,
        log_loss_calibrated=log_loss(calibrated, test_truth),
        ece_calibrated=expected_calibration_error(confidence, correct, bins=CALIBRATION_BINS),
        threshold=float(certificate.threshold),
        certified=certificate.certified,
        certified_precision=float(certificate.certified_precision),
        best_certifiable_precision=certificate.best_certifiable_precision,
        images_needed=float(certificate.images_needed),
        val_answered=certificate.answered,
        val_errors=certificate.errors,
        val_coverage=float(certificate.coverage),
        coverage=float(on_test["coverage"]),
        selective_accuracy=float(on_test["accuracy"]),
        selective_ci_low=float(on_test["accuracy_ci_low"]),
        selective_ci_high=float(on_test["accuracy_ci_high"]),
        answered=int(on_test["answered"]),
        test_images=len(test_truth),
        statement=certificate.statement(len(val_truth)),
    )
    raw_confidence = probabilities.max(axis=1)
    return Calibration(
        report,
        curve=risk_coverage(confidence, correct),
        val_curve=risk_coverage(val_confidence, val_correct),
        bins=reliability_bins(raw_confidence, probabilities.argmax(axis=1) == test_truth, CALIBRATION_BINS),
        bins_calibrated=reliability_bins(confidence, correct, CALIBRATION_BINS),
    )


@dataclass(frozen=True)
class CalibrationFiles:
    out_dir: str
    kind: ClassVar[str] = KIND

    @property
    def risk_coverage_path(self) -> Path:
        return Path(self.out_dir) / RISK_COVERAGE_FILE

    @property
    def reliability_path(self) -> Path:
        return Path(self.out_dir) / RELIABILITY_FILE

    @property
    def risk_coverage_chart_path(self) -> Path:
        return Path(self.out_dir) / RISK_COVERAGE_CHART

    def report(self) -> CalibrationReport:
        return CalibrationReport.from_json(json.loads((Path(self.out_dir) / SUMMARY_FILE).read_text()))

    def curve(self) -> pd.DataFrame:
        return pd.read_parquet(self.risk_coverage_path)

    def artifact_paths(self) -> tuple[Path, ...]:
        """What goes to MLflow beside the numbers: the risk-coverage table and both charts."""
        return (self.risk_coverage_path, self.reliability_path, self.risk_coverage_chart_path)


def write_calibration(calibration: Calibration, out_dir: Path, title: str) -> CalibrationFiles:
    """The report, the test risk-coverage table, the reliability diagram and the risk-coverage chart."""
    report = calibration.report
    with atomic_directory(out_dir) as tmp:
        calibration.curve.to_parquet(tmp / RISK_COVERAGE_FILE, index=False)
        reliability_diagram_png(
            calibration.bins_calibrated, tmp / RELIABILITY_FILE, f"{title}: test, T={report.temperature:.2f}"
        )
        risk_coverage_png(
            {"test": calibration.curve, "validation": calibration.val_curve},
            tmp / RISK_COVERAGE_CHART,
            f"{title}: accuracy on the answered images",
            target_precision=report.target_precision,
        )
        (tmp / SUMMARY_FILE).write_text(json.dumps(report.to_json(), indent=2))
    return CalibrationFiles(str(out_dir))
