"""A confidence threshold with a guarantee: Learn then Test, fixed-sequence testing.

The rule is Angelopoulos, Bates, Candès, Jordan & Lei, "Learn then Test: Calibrating Predictive
Algorithms to Achieve Risk Control" (2021), applied to selective classification. On m labelled images
that played no part in training the model or fitting its temperature:

- the candidate thresholds are the m confidences, most confident first: the a-th answers the a most
  confident images (and any of equal confidence);
- each candidate is a test of "precision below the target": its p-value is the binomial tail
  P(Binomial(n, 1 - target) <= e) for the n images it answers with e errors (scipy.special.bdtr, the
  binomial distribution function without scipy.stats' second of import in every step process);
- the tests run in that fixed order, towards more answered images, and stop at the first that fails
  (fixed-sequence testing); the threshold is the last that passed, where the most images are answered.

A sequence must start where a test can pass at all: with no error among n0 = ceil(ln level / ln target)
images. One error among the first few would then end it, however good the rest, so there are J
sequences, started at n0, 2 n0, 4 n0, ... (every start <= m), each at level delta / J, and the threshold
answering the most images over all of them is kept. Starts depend only on m, the target and delta,
never on a label. Fixed-sequence testing keeps the chance that a sequence passes any threshold whose
precision is below the target at its level, and the J levels add up to delta (Bonferroni). So with
probability at least 1 - delta over the draw of the m images, the images the chosen threshold answers
on new data from the same distribution are right at least the target's share of the time: the
certified bound is the target. When nothing passes, nothing may be answered (`NOTHING_ANSWERED` lies
above every probability).

`comparisons` divides delta once more when the same images also chose among several models
(checkpoints): each is certified at delta / comparisons, so the promise holds for whichever is chosen.

The search is vectorised over rows (one row of m images per draw, model or target), so the simulation
test runs a thousand draws at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
from scipy import special

from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError, as_confidence_correct
from car_maker_pipeline.evaluation.metrics.selective import check_target_precision

METHOD = "Learn then Test (Angelopoulos et al. 2021): fixed-sequence binomial tests from several starts"
# The threshold of a model that may answer nothing: above every probability, so every answer is "unsure".
NOTHING_ANSWERED = math.nextafter(1.0, math.inf)
# The targets tried for the best precision a set of images can certify.
_TARGET_GRID = np.round(np.arange(0.001, 1.0, 0.001), 3)


def check_delta(value) -> float:
    """delta is the chance that the promise fails: in (0, 1). 0 would need infinitely many images; 1 promises nothing."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0 < value < 1):
        raise CalibrationError(f"delta must be in (0, 1), e.g. 0.05 for a promise kept 95% of the time; got {value!r}")
    return float(value)


def check_comparisons(value) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or value != int(value) or value < 1:
        raise CalibrationError(f"comparisons must be a whole number >= 1 (the models compared), got {value!r}")
    return int(value)


def _first_start(target: float, level: float) -> float:
    """The fewest answered images that pass a test at `level` with no error (inf for a target of 1)."""
    return float(max(1, math.ceil(math.log(level) / math.log(target)))) if target < 1 else math.inf


def sequence_starts(images: int, target_precision: float, delta: float, comparisons: int = 1) -> list[int]:
    """The ranks the J fixed sequences start at: n0, 2 n0, 4 n0, ... <= images, n0 taken at delta / (comparisons J).

    J is the most starts that fit; none when even one sequence at the whole delta cannot start.
    """
    level = check_delta(delta) / check_comparisons(comparisons)
    if images < _first_start(target_precision, level):
        return []
    starts = 1
    while _first_start(target_precision, level / (starts + 1)) * 2**starts <= images:
        starts += 1
    first = int(_first_start(target_precision, level / starts))
    return [first * 2**j for j in range(starts)]


def images_needed(target_precision: float, delta: float, images: int = 0, comparisons: int = 1) -> float:
    """The answered images without an error that the first test needs: n0 for `images` validation images
    (the whole delta when they are too few to start a sequence); inf for a target of 1."""
    starts = sequence_starts(images, target_precision, delta, comparisons)
    return float(starts[0]) if starts else _first_start(target_precision, delta / comparisons)


def fixed_sequence_search(confidence, correct, target_precision, delta: float, comparisons: int = 1) -> dict:
    """The fixed-sequence tests on each row of `confidence` / `correct` (shape (rows, m)); one target or one per row.

    Returns arrays per row: `threshold` (NOTHING_ANSWERED when not certified), `certified`, and `answered`
    and `errors` at the threshold (0 when not certified).
    """
    conf = np.atleast_2d(np.asarray(confidence, dtype=np.float64))
    right = np.atleast_2d(np.asarray(correct, dtype=bool))
    rows, m = conf.shape
    if right.shape != conf.shape or m == 0:
        raise CalibrationError(
            f"confidence and correct must be (rows, images > 0) alike, got {conf.shape}, {right.shape}"
        )
    targets = np.broadcast_to(np.asarray(target_precision, dtype=np.float64), (rows,))
    plans = {float(t): sequence_starts(m, float(t), delta, comparisons) for t in np.unique(targets)}
    starts = np.zeros((rows, max(1, *(len(plan) for plan in plans.values()))), dtype=np.int64)  # 0: no start
    for target, plan in plans.items():
        starts[targets == target, : len(plan)] = plan
    level = check_delta(delta) / check_comparisons(comparisons) / np.maximum(1, (starts > 0).sum(axis=1))

    order = np.argsort(-conf, axis=1, kind="stable")
    sorted_conf = np.take_along_axis(conf, order, axis=1)
    errors_so_far = np.cumsum(~np.take_along_axis(right, order, axis=1), axis=1)
    # Answering the a-th most confident image answers every image of its confidence: n >= a.
    group_end = np.append(sorted_conf[:, 1:] != sorted_conf[:, :-1], np.ones((rows, 1), bool), axis=1)
    answered = np.minimum.accumulate(np.where(group_end, np.arange(m), m)[:, ::-1], axis=1)[:, ::-1] + 1
    errors = np.take_along_axis(errors_so_far, answered - 1, axis=1)
    passed = special.bdtr(errors, answered, (1.0 - targets)[:, None]) <= level[:, None]
    # The first failing rank at or after each rank (m + 1: none); a sequence from s passes s .. that - 1.
    rank = np.arange(1, m + 1)
    first_failure = np.minimum.accumulate(np.where(passed, m + 1, rank)[:, ::-1], axis=1)[:, ::-1]
    ends = np.take_along_axis(first_failure, np.maximum(starts, 1) - 1, axis=1) - 1
    last = np.where((starts > 0) & (ends >= starts), ends, 0).max(axis=1)
    certified = last > 0
    pick = np.maximum(last - 1, 0)[:, None]
    return {
        "threshold": np.where(certified, np.take_along_axis(sorted_conf, pick, axis=1)[:, 0], NOTHING_ANSWERED),
        "certified": certified,
        "answered": np.where(certified, np.take_along_axis(answered, pick, axis=1)[:, 0], 0),
        "errors": np.where(certified, np.take_along_axis(errors, pick, axis=1)[:, 0], 0),
    }


def best_certifiable_precision(confidence, correct, delta: float, comparisons: int = 1) -> float:
    """A target on a 0.1% grid that these images certify at this delta, found by bisection (0 when none does).

    Certifying is not strictly monotone in the target (each target has its own starts), so this is the
    highest the bisection meets, always one that the same rule certifies.
    """
    conf, right = as_confidence_correct(confidence, correct)
    low, high = -1, len(_TARGET_GRID)  # indices: low certified (or -1), high not (or past the grid)
    while high - low > 1 and len(conf):
        middle = (low + high) // 2
        found = fixed_sequence_search(conf, right, _TARGET_GRID[middle], delta, comparisons)
        low, high = (middle, high) if found["certified"][0] else (low, middle)
    return float(_TARGET_GRID[low]) if low >= 0 else 0.0


def percent(share: float) -> str:
    """0.99 -> '99%', 0.995 -> '99.5%'."""
    return f"{share * 100:.1f}".rstrip("0").rstrip(".") + "%"


@dataclass(frozen=True)
class CertifiedThreshold:
    """Answer an image when its confidence >= threshold. With `certified`, the precision on new images is at
    least the target with probability >= 1 - delta; otherwise the threshold lies above every probability and
    the model answers nothing."""

    threshold: float
    target_precision: float
    delta: float
    comparisons: int  # models compared on the same images: each is certified at delta / comparisons
    certified: bool
    answered: int
    errors: int
    images: int
    best_certifiable_precision: float  # the highest target these images certify at this delta (0 when none)
    images_needed: float  # answered images without an error that the target needs at the least

    @property
    def coverage(self) -> float:
        return self.answered / self.images if self.images else 0.0

    @property
    def certified_precision(self) -> float:
        """The promised lower bound on precision: the target when certified, NaN when nothing is promised."""
        return self.target_precision if self.certified else math.nan

    def statement(self, validation_images: int) -> str:
        """What the threshold promises, in words, for the run, the materialization and the registered card."""
        target, confidence = percent(self.target_precision), percent(1 - self.delta)
        models = f", {self.comparisons} checkpoints compared" if self.comparisons > 1 else ""
        if self.certified:
            return (
                f"{target} precision is certified: with probability {confidence}, at least {target} of the answers "
                f"other than 'unsure' are right on new images like these ({self.answered} of {self.images} "
                f"threshold-fold validation images answered, {self.errors} wrong{models}; {METHOD})."
            )
        needed = (
            "no finite number of images certifies 100%; choose a target below 1"
            if math.isinf(self.images_needed)
            else f"about {int(self.images_needed)} answered images without error are needed"
        )
        return (
            f"{target} precision cannot be certified with {validation_images} validation images; {needed} "
            f"({self.images} of the validation images test the threshold, at {confidence} confidence{models}). "
            f"The best precision these images certify is {percent(self.best_certifiable_precision)}. "
            "Every answer is 'unsure' until then."
        )


def certify_threshold(
    confidence, correct, target_precision: float, delta: float, comparisons: int = 1
) -> CertifiedThreshold:
    """The fixed-sequence tests on one set of images (validation images the model and temperature did not see)."""
    target = check_target_precision(target_precision)
    delta, comparisons = check_delta(delta), check_comparisons(comparisons)
    conf, right = as_confidence_correct(confidence, correct)
    needed = images_needed(target, delta, len(conf), comparisons)
    best = best_certifiable_precision(conf, right, delta, comparisons)
    if not len(conf):
        return CertifiedThreshold(NOTHING_ANSWERED, target, delta, comparisons, False, 0, 0, 0, best, needed)
    found = {key: value[0] for key, value in fixed_sequence_search(conf, right, target, delta, comparisons).items()}
    return CertifiedThreshold(
        threshold=float(found["threshold"]),
        target_precision=target,
        delta=delta,
        comparisons=comparisons,
        certified=bool(found["certified"]),
        answered=int(found["answered"]),
        errors=int(found["errors"]),
        images=len(conf),
        best_certifiable_precision=best,
        images_needed=needed,
    )
