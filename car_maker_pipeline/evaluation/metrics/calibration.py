"""How far a classifier's probabilities can be trusted: top-k, macro accuracy, log-loss, calibration.

Top-1 accuracy says nothing about the confidence attached to each answer, yet that confidence is what
decides whether an answer can be used without a person checking it (see `selective`). Calibration is
measured with reliability bins and the expected calibration error (ECE), and repaired with one
temperature fitted on validation data, because a single scale keeps the ranking of makers (so accuracy
is unchanged) and cannot overfit a split of a few hundred images the way per-maker corrections would.

Pure numpy/pandas; matplotlib is imported only when a chart is drawn, so callers that only validate
settings stay light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd

from car_maker_pipeline.evaluation.metrics.accuracy import summarize

# log T is searched on this range: below 0.05 or above 100 the softmax is practically one-hot or uniform,
# so a fit at a bound says the scores are separable (or uninformative) rather than naming a useful scale.
TEMPERATURE_BOUNDS = (0.05, 100.0)
_GRID_POINTS = 81
# Rows of float32 softmax output sum to 1 only up to rounding; confidences may overshoot [0, 1] likewise.
_SUM_TOLERANCE = 1e-4
_RANGE_TOLERANCE = 1e-6
BIN_COLUMNS = ("bin_low", "bin_high", "images", "mean_confidence", "accuracy")


class CalibrationError(ValueError):
    """Input that calibration or selective prediction cannot use; the message says what to pass instead."""


def _log_score_matrix(log_scores) -> np.ndarray:
    scores = np.asarray(log_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise CalibrationError(
            f"log scores must be an (images, makers) array with at least one maker, got shape {scores.shape}; "
            "pass one row of per-maker log-likelihoods per image"
        )
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise CalibrationError(
            "log scores hold NaN or +inf; pass log-likelihoods (-inf is allowed for an impossible maker)"
        )
    if len(scores) and np.isneginf(scores).all(axis=1).any():
        row = int(np.flatnonzero(np.isneginf(scores).all(axis=1))[0])
        raise CalibrationError(
            f"row {row} of the log scores is -inf for every maker; each image needs one finite score"
        )
    return scores


def probability_matrix(probabilities) -> np.ndarray:
    """Checked (images, labels) probabilities; labels are makers or classes, whichever the task answers."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise CalibrationError(
            f"probabilities must be an (images, labels) array (a column per maker or class), got shape {p.shape}"
        )
    if not np.isfinite(p).all() or (p < 0).any():
        raise CalibrationError("probabilities hold negative, NaN or infinite values; pass softmax(log_scores)")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOLERANCE)
    if len(bad):
        raise CalibrationError(
            f"probability rows must sum to 1, row {int(bad[0])} sums to {sums[bad[0]]:.6f}; "
            "pass softmax(log_scores), not raw scores"
        )
    return p


def label_indices(truth, images: int, makers: int) -> np.ndarray:
    """Checked true label indices (maker or class), one per image, each a column of the scores."""
    labels = np.asarray(truth)
    if labels.ndim != 1 or len(labels) != images:
        raise CalibrationError(
            f"truth must hold one label index (maker or class) per image ({images}), got shape {labels.shape}"
        )
    if not len(labels):
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise CalibrationError(
            f"truth must hold integer maker indices, got dtype {labels.dtype}; map names to indices first"
        )
    if labels.min() < 0 or labels.max() >= makers:
        raise CalibrationError(
            f"truth holds maker index {int(labels.min() if labels.min() < 0 else labels.max())}, "
            f"outside 0..{makers - 1}; use the same maker order as the score columns"
        )
    return labels.astype(np.int64)


def as_confidence_correct(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """Checked float confidences in [0, 1] and bool correctness, shared by the calibration and selective code."""
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct)
    if conf.ndim != 1 or right.shape != conf.shape:
        raise CalibrationError(
            f"confidence and correct must be 1-D and of equal length, got shapes {conf.shape} and {right.shape}"
        )
    if right.dtype != bool:
        if right.size and not (np.isin(right, (0, 1)).all()):
            raise CalibrationError("correct must be booleans (or 0/1), one per image")
        right = right.astype(bool)
    if not np.isfinite(conf).all() or (conf < -_RANGE_TOLERANCE).any() or (conf > 1 + _RANGE_TOLERANCE).any():
        raise CalibrationError(
            "confidence must be probabilities in [0, 1]; pass the predicted maker's softmax probability"
        )
    return np.clip(conf, 0.0, 1.0), right


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise CalibrationError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def softmax(log_scores, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of softmax(log_scores / T); the row maximum is subtracted first so exp cannot overflow."""
    scores = _log_score_matrix(log_scores)
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (0 < temperature < math.inf):
        raise CalibrationError(f"temperature must be a finite number > 0, got {temperature!r}; use fit_temperature")
    scaled = scores / float(temperature)
    if not len(scaled):
        return scaled
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def top_k_accuracy(probabilities, truth, k: int) -> float:
    """Share of images whose true maker ranks in the top k; equal probabilities rank the lower index first
    (as argmax does), so a tie cannot count an image twice. k above the number of makers means all of them."""
    p = probability_matrix(probabilities)
    labels = label_indices(truth, len(p), p.shape[1])
    k = min(_positive_int(k, "k"), p.shape[1])
    if not len(p):
        return math.nan
    true_p = p[np.arange(len(p)), labels][:, None]
    earlier = np.arange(p.shape[1])[None, :] < labels[:, None]
    rank = (p > true_p).sum(axis=1) + ((p == true_p) & earlier).sum(axis=1)
    return float(np.mean(rank < k))


def macro_accuracy(probabilities, truth) -> float:
    """Mean recall over the makers present in truth (argmax prediction): rare makers weigh as much as common
    ones, and makers absent from the split are not counted as 0."""
    p = probability_matrix(probabilities)
    labels = label_indices(truth, len(p), p.shape[1])
    frame = pd.DataFrame({"true_maker": labels, "predicted_maker": p.argmax(axis=1)})
    return summarize(frame, list(range(p.shape[1]))).macro_accuracy


def log_loss(probabilities, truth, eps: float = 1e-12) -> float:
    """Mean -log p(true maker); p is clipped at eps so one confident mistake costs -log(eps), not infinity."""
    p = probability_matrix(probabilities)
    labels = label_indices(truth, len(p), p.shape[1])
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (0 < eps < 1):
        raise CalibrationError(f"eps must be in (0, 1), e.g. 1e-12, got {eps!r}")
    if not len(p):
        return math.nan
    return float(np.mean(-np.log(np.clip(p[np.arange(len(p)), labels], eps, 1.0))))


def reliability_bins(confidence, correct, bins: int = 15) -> pd.DataFrame:
    """Images, mean confidence and accuracy per equal-width confidence bin on [0, 1].

    Bins are [low, high) except the last, [low, 1]; membership follows the reported edges exactly, so a
    confidence equal to an edge lies in the bin that starts there. Empty bins keep their row with NaN.
    """
    conf, right = as_confidence_correct(confidence, correct)
    count = _positive_int(bins, "bins")
    edges = np.linspace(0.0, 1.0, count + 1)
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, count - 1)
    images = np.bincount(index, minlength=count)
    filled = images > 0
    mean_conf = np.full(count, math.nan)
    accuracy = np.full(count, math.nan)
    mean_conf[filled] = np.bincount(index, weights=conf, minlength=count)[filled] / images[filled]
    accuracy[filled] = np.bincount(index, weights=right, minlength=count)[filled] / images[filled]
    return pd.DataFrame(
        {
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "images": images.astype(np.int64),
            "mean_confidence": mean_conf,
            "accuracy": accuracy,
        }
    )


def _ece_of_bins(table: pd.DataFrame) -> float:
    total = int(table["images"].sum())
    if total == 0:
        return math.nan
    filled = table[table["images"] > 0]
    gaps = (filled["accuracy"] - filled["mean_confidence"]).abs() * filled["images"]
    return float(gaps.sum() / total)


def expected_calibration_error(confidence, correct, bins: int = 15) -> float:
    """Sum over bins of |accuracy - mean confidence| weighted by the bin's share of images (NaN with none)."""
    return _ece_of_bins(reliability_bins(confidence, correct, bins))


def _nll(scores: np.ndarray, labels: np.ndarray, log_t: float) -> float:
    scaled = scores / math.exp(log_t)
    top = scaled.max(axis=1)
    log_norm = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(scaled)), labels]))


def _golden_minimum(f, a: float, b: float, tolerance: float = 1e-7) -> tuple[float, float]:
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def fit_temperature(log_scores, truth) -> float:
    """The T in TEMPERATURE_BOUNDS minimising the NLL of softmax(log_scores / T) on the data given.

    The NLL is convex in 1/T, hence unimodal in log T: a fixed grid on log T finds the right bracket and a
    golden-section search refines it, with no random start and no gradient to diverge. T = 1 is also a
    candidate and is kept unless something is strictly better, so the fit never raises the NLL on its own data.
    """
    scores = _log_score_matrix(log_scores)
    labels = label_indices(truth, len(scores), scores.shape[1])
    if not len(scores):
        raise CalibrationError("cannot fit a temperature on zero images; pass the validation split's log scores")
    if len(np.unique(labels)) < 2:
        raise CalibrationError(
            f"a temperature fitted on a validation split with one maker (index {int(labels[0])}) only learns to "
            "favour that maker; fit it on a validation split with at least two makers (a stratified split has all)"
        )

    def nll(log_t: float) -> float:
        return _nll(scores, labels, log_t)

    best_log_t, best = 0.0, nll(0.0)
    grid = np.linspace(math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]), _GRID_POINTS)
    values = [nll(float(g)) for g in grid]
    i = int(np.argmin(values))
    refined = _golden_minimum(nll, float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)]))
    for log_t, value in ((float(grid[i]), values[i]), refined):
        if value < best:
            best_log_t, best = log_t, value
    return float(np.clip(math.exp(best_log_t), *TEMPERATURE_BOUNDS))  # exp(log 100) may round past 100


@dataclass(frozen=True)
class ProbabilityMetrics:
    top1: float
    top3: float
    macro_accuracy: float
    log_loss: float
    ece: float

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}top1_accuracy": self.top1,
            f"{prefix}top3_accuracy": self.top3,
            f"{prefix}macro_accuracy": self.macro_accuracy,
            f"{prefix}log_loss": self.log_loss,
            f"{prefix}ece": self.ece,
        }


def probability_metrics(probabilities, truth, bins: int = 15) -> ProbabilityMetrics:
    """Everything one evaluated split reports about its probabilities; confidence is the argmax probability."""
    p = probability_matrix(probabilities)
    labels = label_indices(truth, len(p), p.shape[1])
    predicted = p.argmax(axis=1)
    return ProbabilityMetrics(
        top1=top_k_accuracy(p, labels, 1),
        top3=top_k_accuracy(p, labels, 3),
        macro_accuracy=macro_accuracy(p, labels),
        log_loss=log_loss(p, labels),
        ece=expected_calibration_error(p.max(axis=1), predicted == labels, bins),
    )


def reliability_diagram_png(bins: pd.DataFrame, path, title: str) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, gaps shaded, ECE in the legend."""
    missing = [column for column in BIN_COLUMNS if column not in bins.columns]
    if missing:
        raise CalibrationError(f"reliability bins lack columns {missing}; pass reliability_bins(confidence, correct)")
    import matplotlib.pyplot as plt

    from car_maker_pipeline.evaluation.metrics.figures import save_figure  # sets the Agg backend

    ece = _ece_of_bins(bins)
    filled = bins[bins["images"] > 0]
    widths = filled["bin_high"] - filled["bin_low"]
    figure, axis = plt.subplots(figsize=(5, 5))
    label = f"accuracy (ECE {ece:.3f})" if not math.isnan(ece) else "accuracy (no images)"
    axis.bar(filled["bin_low"], filled["accuracy"], width=widths, align="edge", edgecolor="black", label=label)
    gap = filled["mean_confidence"] - filled["accuracy"]
    axis.bar(
        filled["bin_low"],
        gap,
        bottom=filled["accuracy"],
        width=widths,
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to mean confidence",
    )
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (probability of the predicted maker)")
    axis.set_ylabel("accuracy")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    return save_figure(figure, Path(path))
