"""Selective prediction: answer only above a confidence threshold, leave the rest to a person.

The risk-coverage curve says, for every threshold worth considering, how many images are answered and
how many of them are right. Which threshold to serve is certified on validation images
(`certification.py`), then applied here to another split (test): the test figure carries a Wilson
interval, because at a high target precision the answered set is judged by very few mistakes.

Pure numpy/pandas; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

import numpy as np
import pandas as pd

from car_maker_pipeline.evaluation.metrics.accuracy import wilson_interval
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError, as_confidence_correct

CURVE_COLUMNS = ("threshold", "answered", "coverage", "accuracy")


def check_target_precision(value: float) -> float:
    """The target must be a share of answers that are right: in (0, 1]. 0 would answer everything
    regardless, and above 1 can never be met."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0 < value <= 1):
        raise CalibrationError(f"target precision must be in (0, 1], e.g. 0.99 for 99% correct answers; got {value!r}")
    return float(value)


def risk_coverage(confidence, correct) -> pd.DataFrame:
    """Accuracy on the answered images for each threshold worth considering: one row per distinct confidence,
    most confident first. Images with equal confidence are answered together, since no threshold can split
    them; "equal" is float equality, so near-equal values stay separate levels."""
    conf, right = as_confidence_correct(confidence, correct)
    if not len(conf):
        return pd.DataFrame({column: pd.Series(dtype=float) for column in CURVE_COLUMNS}).astype({"answered": "int64"})
    order = np.argsort(-conf, kind="stable")
    levels, hits = conf[order], np.cumsum(right[order])
    last = np.flatnonzero(np.append(levels[1:] != levels[:-1], True))  # last image of each confidence level
    answered = last + 1
    return pd.DataFrame(
        {
            "threshold": levels[last],
            "answered": answered.astype(np.int64),
            "coverage": answered / len(conf),
            "accuracy": hits[last] / answered,
        }
    )


def apply_threshold(confidence, correct, threshold: float) -> dict:
    """Coverage and accuracy (with its Wilson interval) on the images with confidence >= threshold; meant for
    a split other than the one the threshold was chosen on."""
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or math.isnan(threshold):
        raise CalibrationError(f"threshold must be a number, got {threshold!r}; use certify_threshold(...).threshold")
    conf, right = as_confidence_correct(confidence, correct)
    answered_mask = conf >= threshold
    answered, hits = int(answered_mask.sum()), int(right[answered_mask].sum())
    low, high = wilson_interval(hits, answered)
    return {
        "coverage": answered / len(conf) if len(conf) else math.nan,
        "answered": answered,
        "images": len(conf),
        "accuracy": hits / answered if answered else math.nan,
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
    }


def risk_coverage_png(curves: dict[str, pd.DataFrame], path, title: str, target_precision: float | None = None) -> Path:
    """Accuracy on answered images against coverage, one line per named curve, with the target as a line."""
    target = None if target_precision is None else check_target_precision(target_precision)
    for name, curve in curves.items():
        missing = [column for column in CURVE_COLUMNS if column not in curve.columns]
        if missing:
            raise CalibrationError(f"curve {name!r} lacks columns {missing}; pass risk_coverage(confidence, correct)")
    import matplotlib.pyplot as plt

    from car_maker_pipeline.evaluation.metrics.figures import save_figure  # sets the Agg backend

    figure, axis = plt.subplots(figsize=(7, 4))
    lowest = 1.0 if target is None else target
    for name, curve in curves.items():
        if curve.empty:
            continue
        axis.plot(curve["coverage"], curve["accuracy"], marker="." if len(curve) <= 60 else None, label=name)
        lowest = min(lowest, float(curve["accuracy"].min()))
    if target is not None:
        axis.axhline(target, color="grey", linestyle=":", label=f"target precision {target:.1%}")
    if not axis.get_legend_handles_labels()[0]:
        axis.text(0.5, 0.5, "no images", ha="center", va="center", transform=axis.transAxes)
    else:
        axis.legend(loc="lower left", fontsize=8)
    axis.set_xlim(0, 1.02)
    axis.set_ylim(max(0.0, lowest - 0.05), 1.005)
    axis.set_xlabel("coverage (share of images answered)")
    axis.set_ylabel("accuracy on answered images")
    axis.set_title(title)
    figure.tight_layout()
    return save_figure(figure, Path(path))
