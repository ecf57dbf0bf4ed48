"""How far an evaluation's probabilities can be trusted, and where the classifier should say "unsure".

Given the predictions of one model on validation and on test (every maker's log-probability per
image, from `MakerClassifier`), `calibrate`:

- measures the probabilities on test as they are: top-1, top-3 and macro accuracy, log loss and the
  expected calibration error over 15 bins;
- fits one temperature on validation (never on test) and measures test again with it;
- chooses, on validation, the lowest confidence threshold whose answered images reach the target
  precision, and applies it to test: the share answered (coverage) and the accuracy reached there,
  with its 95% Wilson interval. Below the threshold the classifier answers "unsure".

The temperature and threshold are what the registered model carries, so the served model abstains
exactly as measured here. Plain numpy on stored predictions: no model runs, nothing is cached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from car_maker_pipeline.evaluation.metrics.calibration import (
    CalibrationError,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    probability_metrics,
    reliability_bins,
    reliability_diagram_png,
    softmax,
)
from car_maker_pipeline.evaluation.metrics.selective import (
    apply_threshold,
    check_target_precision,
    choose_threshold,
    risk_coverage,
    risk_coverage_png,
)
from car_maker_pipeline.evaluation.settings import DEFAULT_TARGET_PRECISION
from car_maker_pipeline.storage import atomic_directory

CALIBRATION_BINS = 15
RISK_COVERAGE_FILE, RELIABILITY_FILE, RISK_COVERAGE_CHART, SUMMARY_FILE = (
    "risk_coverage.parquet",
    "reliability_diagram.png",
    "risk_coverage.png",
    "calibration.json",
)


def maker_log_probs(predictions: pd.DataFrame, makers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities (n, makers), true maker indices (n,)) of stored predictions."""
    if "log_probs" not in predictions or predictions["log_probs"].isna().any():
        raise CalibrationError(
            "These predictions carry no per-maker probabilities (they were written before every maker was "
            "scored); materialize the evaluation again to score them."
        )
    log_probs = np.stack([np.asarray(row, dtype=float) for row in predictions["log_probs"]])
    if log_probs.shape[1] != len(makers):
        raise CalibrationError(
            f"The predictions score {log_probs.shape[1]} makers but the maker list has {len(makers)}; "
            "they come from another maker dataset. Materialize the evaluation again."
        )
    index = {maker: i for i, maker in enumerate(makers)}
    unknown = sorted(set(predictions["true_maker"]) - set(index))
    if unknown:
        raise CalibrationError(f"True makers {unknown} are not in the maker list {makers}.")
    return log_probs, predictions["true_maker"].map(index).to_numpy(dtype=int)


@dataclass(frozen=True)
class CalibrationReport:
    target_precision: float
    temperature: float
    validation_images: int
    top1_accuracy: float  # test, from here on
    top3_accuracy: float
    macro_accuracy: float
    log_loss: float
    ece: float
    log_loss_calibrated: float
    ece_calibrated: float
    threshold: float  # on the calibrated probability of the top maker; answer "unsure" below it
    threshold_reached: bool  # False: no threshold reaches the target on validation, so nothing is answered
    val_coverage: float
    coverage: float
    selective_accuracy: float  # on the answered test images (NaN when none)
    selective_ci_low: float
    selective_ci_high: float
    answered: int
    test_images: int

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for MLflow and Dagster metadata."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items()}

    def describe(self) -> str:
        return (
            f"top-1 {self.top1_accuracy:.1%}, top-3 {self.top3_accuracy:.1%}, ECE {self.ece:.3f} -> "
            f"{self.ece_calibrated:.3f} at T={self.temperature:.2f}; at {self.target_precision:.0%} target "
            f"precision: coverage {self.coverage:.1%}, accuracy {self.selective_accuracy:.1%} "
            f"[{self.selective_ci_low:.1%}, {self.selective_ci_high:.1%}]"
        )

    @classmethod
    def from_json(cls, payload: dict) -> CalibrationReport:
        return cls(**{key: payload[key] for key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Calibration:
    report: CalibrationReport
    curve: pd.DataFrame  # risk-coverage on test (calibrated confidence)
    val_curve: pd.DataFrame
    bins: pd.DataFrame  # reliability on test, before temperature
    bins_calibrated: pd.DataFrame


def calibrate(
    validation: pd.DataFrame, test: pd.DataFrame, makers: list[str], target_precision: float = DEFAULT_TARGET_PRECISION
) -> Calibration:
    """Temperature and threshold from `validation`, measured on `test` (both `EvaluationRun.predictions`)."""
    target_precision = check_target_precision(target_precision)
    val_log_probs, val_truth = maker_log_probs(validation, makers)
    test_log_probs, test_truth = maker_log_probs(test, makers)
    probabilities = softmax(test_log_probs)
    raw = probability_metrics(probabilities, test_truth, bins=CALIBRATION_BINS)
    temperature = fit_temperature(val_log_probs, val_truth)

    def confidence_and_correct(log_probs, truth):
        calibrated = softmax(log_probs, temperature)
        return calibrated.max(axis=1), calibrated.argmax(axis=1) == truth, calibrated

    val_confidence, val_correct, _ = confidence_and_correct(val_log_probs, val_truth)
    confidence, correct, calibrated = confidence_and_correct(test_log_probs, test_truth)
    threshold = choose_threshold(val_confidence, val_correct, target_precision)
    on_test = apply_threshold(confidence, correct, threshold.threshold)
    report = CalibrationReport(
        target_precision=target_precision,
        temperature=float(temperature),
        validation_images=len(val_truth),
        top1_accuracy=raw.top1,
        top3_accuracy=raw.top3,
        macro_accuracy=raw.macro_accuracy,
        log_loss=raw.log_loss,
        ece=raw.ece,
        log_loss_calibrated=log_loss(calibrated, test_truth),
        ece_calibrated=expected_calibration_error(confidence, correct, bins=CALIBRATION_BINS),
        threshold=float(threshold.threshold),
        threshold_reached=bool(threshold.reached),
        val_coverage=float(threshold.coverage),
        coverage=float(on_test["coverage"]),
        selective_accuracy=float(on_test["accuracy"]),
        selective_ci_low=float(on_test["accuracy_ci_low"]),
        selective_ci_high=float(on_test["accuracy_ci_high"]),
        answered=int(on_test["answered"]),
        test_images=len(test_truth),
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
        (tmp / SUMMARY_FILE).write_text(json.dumps(asdict(report), indent=2))
    return CalibrationFiles(str(out_dir))
