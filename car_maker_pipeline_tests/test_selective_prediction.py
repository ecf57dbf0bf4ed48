"""Selective prediction: the risk-coverage curve, the target precision, a threshold applied to other data
and the risk-coverage chart (no model; numbers worked out by hand).

| case                                                   | expected                                                 |
|--------------------------------------------------------|----------------------------------------------------------|
| risk-coverage on 6 images, ties                        | hand table; equal confidences form one level             |
| target precision 0, -0.1, 1.5, NaN, inf, True          | CalibrationError naming the value; 1.0 accepted          |
| apply_threshold on other data                          | coverage, accuracy, Wilson interval by hand              |
| risk-coverage chart                                    | PNG magic bytes, non-trivial size; bad tables rejected   |

The certified threshold itself (Learn then Test) is tested in test_precision_promise.py.
"""

from __future__ import annotations

import math

import pytest

from car_maker_pipeline.evaluation.metrics.accuracy import wilson_interval
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError
from car_maker_pipeline.evaluation.metrics.selective import (
    apply_threshold,
    check_target_precision,
    risk_coverage,
    risk_coverage_png,
)
from car_maker_pipeline_tests.support.figures import assert_png

SEL_CONFIDENCE = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5]
SEL_CORRECT = [True, True, False, True, True, False]


def test_risk_coverage_spec():
    curve = risk_coverage(SEL_CONFIDENCE, SEL_CORRECT)
    assert list(curve.columns) == ["threshold", "answered", "coverage", "accuracy"]
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]  # the two 0.8s are one level
    assert curve["answered"].tolist() == [1, 3, 4, 5, 6]
    assert curve["coverage"].tolist() == pytest.approx([1 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 2 / 3, 0.75, 0.8, 4 / 6])
    assert risk_coverage(SEL_CONFIDENCE[::-1], SEL_CORRECT[::-1]).equals(curve)  # input order does not matter
    assert risk_coverage([], []).empty


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.9", None])
def test_target_precision_out_of_range_rejected(value):
    with pytest.raises(CalibrationError, match=r"target precision must be in \(0, 1\]") as raised:
        check_target_precision(value)
    assert repr(value) in str(raised.value)


@pytest.mark.parametrize("value", [1.0, 1, 0.99, 1e-9])
def test_target_precision_in_range_accepted(value):
    assert check_target_precision(value) == float(value)


TEST_CONFIDENCE = [0.95, 0.9, 0.85, 0.5, 0.2]
TEST_CORRECT = [True, True, False, True, False]


@pytest.mark.parametrize(
    ("threshold", "answered", "coverage", "accuracy", "ci_low", "ci_high"),
    [
        (0.85, 3, 0.6, 2 / 3, 0.2077, 0.9385),  # Wilson 95% for 2 of 3
        (0.0, 5, 1.0, 0.6, 0.2307, 0.8824),  # 3 of 5
        (0.95, 1, 0.2, 1.0, 0.2065, 1.0),  # 1 of 1; the threshold itself is answered
        (0.96, 0, 0.0, math.nan, 0.0, 1.0),  # nothing answered
    ],
)
def test_apply_threshold_on_other_data(threshold, answered, coverage, accuracy, ci_low, ci_high):
    result = apply_threshold(TEST_CONFIDENCE, TEST_CORRECT, threshold)
    assert set(result) == {"coverage", "answered", "images", "accuracy", "accuracy_ci_low", "accuracy_ci_high"}
    assert (result["answered"], result["images"]) == (answered, 5)
    assert result["coverage"] == pytest.approx(coverage)
    assert result["accuracy"] == pytest.approx(accuracy, nan_ok=True)
    assert (result["accuracy_ci_low"], result["accuracy_ci_high"]) == pytest.approx((ci_low, ci_high), abs=1e-4)
    right = round(accuracy * answered) if answered else 0
    assert (result["accuracy_ci_low"], result["accuracy_ci_high"]) == wilson_interval(right, answered)


@pytest.mark.parametrize("threshold", [math.nan, None, "0.5"])
def test_apply_threshold_rejects_non_numbers(threshold):
    with pytest.raises(CalibrationError, match="threshold must be a number"):
        apply_threshold(TEST_CONFIDENCE, TEST_CORRECT, threshold)


def test_risk_coverage_png(tmp_path):
    curves = {
        "validation": risk_coverage(SEL_CONFIDENCE, SEL_CORRECT),
        "test": risk_coverage(TEST_CONFIDENCE, TEST_CORRECT),
        "empty": risk_coverage([], []),
    }
    path = risk_coverage_png(curves, tmp_path / "risk_coverage.png", "demo: selective prediction", 0.8)
    assert_png(path)
    assert_png(risk_coverage_png({}, tmp_path / "nothing.png", "no curves"))
    with pytest.raises(CalibrationError, match="risk_coverage"):
        risk_coverage_png({"test": curves["test"].drop(columns=["coverage"])}, tmp_path / "bad.png", "bad")
    with pytest.raises(CalibrationError, match="target precision"):
        risk_coverage_png(curves, tmp_path / "bad.png", "bad", target_precision=1.5)
