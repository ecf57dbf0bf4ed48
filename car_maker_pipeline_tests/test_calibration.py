"""Probability metrics and temperature scaling (no model; numbers worked out by hand).

| case                                                   | expected                                                 |
|--------------------------------------------------------|----------------------------------------------------------|
| softmax of small rows, huge/tiny offsets, -inf, T != 1 | hand values; rows sum to 1; shift-invariant              |
| softmax temperature 0, -1, NaN, inf; 1-D or NaN scores  | CalibrationError                                         |
| top-k on 5 rows with ties (ranks 0,1,3,0,1)            | k=1 0.4, k=2 0.8, k=3 0.8, k=4 1.0, k=10 1.0 (clipped)   |
| macro accuracy, unbalanced makers                      | mean recall over present makers, differs from accuracy   |
| log-loss of p(true) 0.5/0.25, 1, 0 (clipped)           | 1.5 ln 2, 0, -ln eps                                     |
| log-loss of random probabilities                       | sklearn.metrics.log_loss                                 |
| Wilson interval, n 1..60, every k                      | scipy.stats.binomtest(k, n).proportion_ci("wilson")      |
| reliability bins / ECE on 6 images in 4 bins           | per-bin table by hand; ECE 0.95 / 6                      |
| edge confidences 0, 0.25, 0.5, 1                       | left edge inclusive, 1 in the last bin                   |
| probabilities not summing to 1, truth out of range     | CalibrationError naming the row / index                  |
| fit_temperature on data drawn from softmax(z / T)      | T within 10% for T in {0.5, 2}; NLL below NLL at T=1     |
| fit_temperature on random data                         | NLL never above NLL at T=1; deterministic                |
| fit_temperature with one maker or zero images          | CalibrationError (at least two makers)                   |
| reliability diagram                                    | PNG magic bytes, non-trivial size; bad tables rejected   |

Selective prediction (risk-coverage, thresholds) is in test_selective_prediction.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from car_maker_pipeline.evaluation.metrics.accuracy import wilson_interval
from car_maker_pipeline.evaluation.metrics.calibration import (
    CalibrationError,
    ProbabilityMetrics,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    macro_accuracy,
    probability_metrics,
    reliability_bins,
    reliability_diagram_png,
    softmax,
    top_k_accuracy,
)
from car_maker_pipeline_tests.support.figures import assert_png

LN3 = math.log(3)


def _nll(log_scores, truth, temperature):
    return log_loss(softmax(log_scores, temperature), truth)


def _draw(temperature, seed, images=4000, makers=10):
    """Scores z and truth drawn from softmax(z / temperature): the MLE of T is temperature."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 3.0, (images, makers))
    cumulative = np.cumsum(softmax(scores, temperature), axis=1)
    truth = (rng.random((images, 1)) > cumulative).sum(axis=1)
    return scores, np.minimum(truth, makers - 1)


# --- softmax ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log_scores", "temperature", "expected"),
    [
        ([[0.0, 0.0]], 1.0, [[0.5, 0.5]]),
        ([[0.0, LN3]], 1.0, [[0.25, 0.75]]),
        ([[1000.0, 1000.0 + LN3]], 1.0, [[0.25, 0.75]]),  # would overflow without the max shift
        ([[-1000.0, -1000.0]], 1.0, [[0.5, 0.5]]),  # would underflow to 0/0
        ([[0.0, -np.inf]], 1.0, [[1.0, 0.0]]),
        ([[0.0, 2 * LN3]], 2.0, [[0.25, 0.75]]),
        ([[0.0, LN3 / 2]], 0.5, [[0.25, 0.75]]),
        ([[0.0, LN3, 0.0]], 1.0, [[0.2, 0.6, 0.2]]),
    ],
)
def test_softmax_spec(log_scores, temperature, expected):
    assert softmax(np.array(log_scores), temperature) == pytest.approx(np.array(expected))


def test_softmax_rows_sum_to_one_and_ignore_row_shifts():
    scores = np.random.default_rng(0).normal(0, 20, (50, 7))
    probabilities = softmax(scores, 0.7)
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(50))
    assert softmax(scores + np.arange(50)[:, None] * 100, 0.7) == pytest.approx(probabilities)
    assert (probabilities.argmax(axis=1) == scores.argmax(axis=1)).all()
    assert softmax(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize(
    ("log_scores", "temperature"),
    [
        ([[0.0, 1.0]], 0.0),
        ([[0.0, 1.0]], -1.0),
        ([[0.0, 1.0]], math.nan),
        ([[0.0, 1.0]], math.inf),
        ([0.0, 1.0], 1.0),  # 1-D
        ([[0.0, math.nan]], 1.0),
        ([[-np.inf, -np.inf]], 1.0),
    ],
)
def test_softmax_rejects_bad_input(log_scores, temperature):
    with pytest.raises(CalibrationError):
        softmax(np.array(log_scores), temperature)


# --- top-k, macro accuracy, log-loss ------------------------------------------------------------------

# Ranks of the true maker (ties: lower index first): 0, 1, 3, 0, 1.
TIES = np.array(
    [
        [0.4, 0.3, 0.2, 0.1],
        [0.1, 0.4, 0.3, 0.2],
        [0.25, 0.25, 0.25, 0.25],
        [0.25, 0.25, 0.25, 0.25],
        [0.1, 0.3, 0.3, 0.3],
    ]
)
TIES_TRUTH = np.array([0, 2, 3, 0, 2])


@pytest.mark.parametrize(("k", "expected"), [(1, 0.4), (2, 0.8), (3, 0.8), (4, 1.0), (10, 1.0)])
def test_top_k_accuracy_spec(k, expected):
    assert top_k_accuracy(TIES, TIES_TRUTH, k) == pytest.approx(expected)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(CalibrationError, match="k must be"):
        top_k_accuracy(TIES, TIES_TRUTH, k)


def test_top_1_is_argmax_accuracy_and_top_k_grows_with_k():
    rng = np.random.default_rng(1)
    probabilities = softmax(np.round(rng.normal(0, 1, (200, 6)), 1))  # rounding makes ties
    truth = rng.integers(0, 6, 200)
    assert top_k_accuracy(probabilities, truth, 1) == pytest.approx(np.mean(probabilities.argmax(axis=1) == truth))
    values = [top_k_accuracy(probabilities, truth, k) for k in range(1, 7)]
    assert values == sorted(values) and values[-1] == 1.0


def _one_hot_like(predicted, makers):
    """Probabilities 0.8 on the predicted maker, the rest shared."""
    rows = np.full((len(predicted), makers), 0.2 / (makers - 1))
    rows[np.arange(len(predicted)), predicted] = 0.8
    return rows


@pytest.mark.parametrize(
    ("truth", "predicted", "makers", "macro", "accuracy"),
    [
        # maker 0 x4 all right, maker 1 x1 wrong, maker 2 absent (not counted as 0): (1 + 0) / 2
        ([0, 0, 0, 0, 1], [0, 0, 0, 0, 0], 3, 0.5, 0.8),
        # recalls 2/3, 1, 0
        ([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], 3, 5 / 9, 4 / 6),
        ([2, 2, 1], [2, 2, 1], 3, 1.0, 1.0),
    ],
)
def test_macro_accuracy_spec(truth, predicted, makers, macro, accuracy):
    probabilities = _one_hot_like(np.array(predicted), makers)
    assert macro_accuracy(probabilities, np.array(truth)) == pytest.approx(macro)
    assert top_k_accuracy(probabilities, np.array(truth), 1) == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("p_true", "eps", "expected"),
    [
        ([0.5, 0.25], 1e-12, 1.5 * math.log(2)),
        ([1.0, 1.0], 1e-12, 0.0),
        ([0.0], 1e-12, -math.log(1e-12)),  # clipped: 27.63, not infinity
        ([0.0, 1.0], 1e-4, -math.log(1e-4) / 2),
    ],
)
def test_log_loss_spec(p_true, eps, expected):
    probabilities = np.array([[p, 1 - p] for p in p_true])
    assert log_loss(probabilities, np.zeros(len(p_true), dtype=int), eps) == pytest.approx(expected)


def test_log_loss_matches_scikit_learn():
    from sklearn.metrics import log_loss as sklearn_log_loss

    rng = np.random.default_rng(8)
    probabilities = softmax(rng.normal(0, 2, (300, 5)))
    truth = rng.integers(0, 5, 300)
    assert log_loss(probabilities, truth) == pytest.approx(sklearn_log_loss(truth, probabilities, labels=range(5)))


def test_wilson_interval_matches_scipy():
    from scipy import stats

    for total in range(1, 61):
        for correct in range(total + 1):
            expected = stats.binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
            assert wilson_interval(correct, total) == pytest.approx((expected.low, expected.high), abs=1e-9)


@pytest.mark.parametrize("eps", [0.0, 1.0, -1e-3])
def test_log_loss_rejects_bad_eps(eps):
    with pytest.raises(CalibrationError, match="eps"):
        log_loss(np.array([[0.5, 0.5]]), np.array([0]), eps)


@pytest.mark.parametrize(
    ("probabilities", "truth", "match"),
    [
        ([[0.5, 0.6]], [0], "row 0 sums to 1.1"),
        ([[2.0, -1.0]], [0], "negative"),
        ([[0.5, 0.5]], [2], "index 2"),
        ([[0.5, 0.5]], [-1], "index -1"),
        ([[0.5, 0.5]], [0.0], "integer"),
        ([[0.5, 0.5]], [0, 1], "one label index"),
    ],
)
def test_metrics_reject_bad_probabilities_or_truth(probabilities, truth, match):
    with pytest.raises(CalibrationError, match=match):
        top_k_accuracy(np.array(probabilities), np.array(truth), 1)


# --- reliability bins and ECE -------------------------------------------------------------------------

CONFIDENCE = [0.1, 0.3, 0.35, 0.6, 0.9, 1.0]
CORRECT = [False, True, False, True, True, True]


def test_reliability_bins_spec():
    table = reliability_bins(CONFIDENCE, CORRECT, bins=4)
    assert list(table.columns) == ["bin_low", "bin_high", "images", "mean_confidence", "accuracy"]
    assert table["bin_low"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert table["bin_high"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert table["images"].tolist() == [1, 2, 1, 2]
    assert table["mean_confidence"].tolist() == pytest.approx([0.1, 0.325, 0.6, 0.95])
    assert table["accuracy"].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize(
    ("confidence", "correct", "bins", "expected"),
    [
        # |0-.1|*1 + |.5-.325|*2 + |1-.6|*1 + |1-.95|*2, over 6 images
        (CONFIDENCE, CORRECT, 4, 0.95 / 6),
        ([0.6, 0.8], [True, False], 2, 0.2),  # first bin empty: skipped, not NaN
        ([0.75] * 4, [True, True, True, False], 4, 0.0),
        ([1.0, 1.0], [True, True], 15, 0.0),
        ([1.0, 1.0], [False, False], 15, 1.0),
        ([0.2, 0.4], [True, False], 1, 0.2),  # one bin: |0.5 - 0.3|
    ],
)
def test_expected_calibration_error_spec(confidence, correct, bins, expected):
    assert expected_calibration_error(confidence, correct, bins) == pytest.approx(expected)


def test_empty_bins_are_nan_and_edges_belong_to_the_bin_they_start():
    table = reliability_bins([0.0, 0.25, 0.5, 1.0], [True] * 4, bins=4)
    assert table["images"].tolist() == [1, 1, 1, 1]
    assert table["mean_confidence"].tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    sparse = reliability_bins([0.9], [True], bins=3)
    assert sparse["images"].tolist() == [0, 0, 1]
    assert sparse["accuracy"].isna().tolist() == [True, True, False]
    assert math.isnan(expected_calibration_error([], [], 15))


def test_ece_is_a_share_and_bins_count_every_image():
    rng = np.random.default_rng(2)
    for _ in range(20):
        confidence = rng.random(100)
        correct = rng.random(100) < confidence
        assert 0.0 <= expected_calibration_error(confidence, correct, 10) <= 1.0
        assert reliability_bins(confidence, correct, 10)["images"].sum() == 100


@pytest.mark.parametrize(
    ("confidence", "correct", "bins"),
    [
        ([1.2], [True], 15),
        ([-0.1], [True], 15),
        ([math.nan], [True], 15),
        ([0.5], [True, False], 15),
        ([0.5], [2], 15),
        ([0.5], [True], 0),
    ],
)
def test_reliability_bins_reject_bad_input(confidence, correct, bins):
    with pytest.raises(CalibrationError):
        reliability_bins(confidence, correct, bins)


def test_probability_metrics_spec():
    probabilities = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # true 0, rank 0
            [0.1, 0.6, 0.2, 0.1],  # true 2, rank 1
            [0.4, 0.3, 0.2, 0.1],  # true 3, rank 3
            [0.5, 0.4, 0.05, 0.05],  # true 1, rank 1
        ]
    )
    metrics = probability_metrics(probabilities, np.array([0, 2, 3, 1]), bins=4)
    # confidences .7 .6 .4 .5, right only the first: bin [.25,.5) |0-.4|*1, bin [.5,.75) |1/3-.6|*3, over 4
    expected = ProbabilityMetrics(
        top1=0.25, top3=0.75, macro_accuracy=0.25, log_loss=-math.log(0.7 * 0.2 * 0.1 * 0.4) / 4, ece=0.3
    )
    for field in ("top1", "top3", "macro_accuracy", "log_loss", "ece"):
        assert getattr(metrics, field) == pytest.approx(getattr(expected, field)), field
    assert metrics.as_metrics("test_") == {
        "test_top1_accuracy": metrics.top1,
        "test_top3_accuracy": metrics.top3,
        "test_macro_accuracy": metrics.macro_accuracy,
        "test_log_loss": metrics.log_loss,
        "test_ece": metrics.ece,
    }


# --- temperature --------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(true_temperature):
    scores, truth = _draw(true_temperature, seed=int(true_temperature * 10))
    fitted = fit_temperature(scores, truth)
    assert fitted == pytest.approx(true_temperature, rel=0.10)
    assert _nll(scores, truth, fitted) < _nll(scores, truth, 1.0)


def test_fit_temperature_never_raises_the_nll_it_was_fitted_on():
    rng = np.random.default_rng(3)
    for trial in range(25):
        scale = rng.choice([0.01, 0.3, 1.0, 5.0])
        scores = rng.normal(0, scale, (int(rng.integers(2, 60)), int(rng.integers(2, 8))))
        truth = rng.integers(0, scores.shape[1], len(scores))
        truth[:2] = [0, 1]  # at least two makers
        fitted = fit_temperature(scores, truth)
        assert 0.05 <= fitted <= 100.0
        assert _nll(scores, truth, fitted) <= _nll(scores, truth, 1.0) + 1e-12, trial
        assert fit_temperature(scores, truth) == fitted  # deterministic


@pytest.mark.parametrize(
    ("scores", "truth", "expected"),
    [
        ([[0.0, 0.0], [0.0, 0.0]], [0, 1], 1.0),  # uninformative scores: T = 1 kept
        ([[5.0, 0.0], [0.0, 5.0]], [0, 1], 0.05),  # separable: the lower bound
        ([[5.0, 0.0], [0.0, 5.0]], [1, 0], 100.0),  # always wrong: the upper bound
    ],
)
def test_fit_temperature_edge_cases(scores, truth, expected):
    assert fit_temperature(np.array(scores), np.array(truth)) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    ("scores", "truth", "match"),
    [
        ([[0.1, 0.2], [0.3, 0.0], [1.0, 0.5]], [1, 1, 1], "at least two makers"),
        (np.zeros((0, 3)), [], "zero images"),
        ([[0.1, 0.2]], [0, 1], "one label index"),
    ],
)
def test_fit_temperature_rejects_unusable_validation_data(scores, truth, match):
    with pytest.raises(CalibrationError, match=match):
        fit_temperature(np.array(scores), np.array(truth, dtype=int))


# --- charts ---------------------------------------------------------------------------------------------


def test_reliability_diagram_png(tmp_path):
    rng = np.random.default_rng(5)
    confidence = rng.random(300)
    bins = reliability_bins(confidence, rng.random(300) < confidence)
    path = reliability_diagram_png(bins, tmp_path / "charts" / "reliability.png", "demo: test split")
    assert path == tmp_path / "charts" / "reliability.png"
    assert_png(path)
    assert_png(reliability_diagram_png(reliability_bins([], []), str(tmp_path / "empty.png"), "no images"))
    with pytest.raises(CalibrationError, match="reliability_bins"):
        reliability_diagram_png(bins.drop(columns=["accuracy"]), tmp_path / "bad.png", "bad")
