"""Draws of validation and test scores from known distributions, for the precision promise's simulation.

Each distribution gives every image a confidence (the top maker's probability) and whether the answer
is right. A draw is one validation set, on which a rule chooses a threshold, and one test set of new
images from the same distribution, on which the precision of the answered images is measured. Rows of
an array are draws, so a thousand draws are a few numpy calls.

`todays_rule` is the threshold rule the pipeline used before it certified its thresholds: the lowest
confidence whose answered validation images reach the target. It lives here, as the "before" of the
simulation test, and nowhere in the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Perfectly separable validation: 3% of answers are wrong; half of those score as low as 0.5-0.9 and the
# other half as high as the right answers (0.9-1). On 36 validation images the wrong ones usually sit
# below every right one (or there is none), yet 1.5% of the answers above any threshold over 0.9 are wrong.
SEPARABLE_ERRORS, SEPARABLE_HIDDEN = 0.03, 0.5


def draw(distribution: str, rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, right) arrays of `shape` from one of three distributions:

    - `calibrated`: confidence ~ Beta(6, 1), right with probability equal to the confidence;
    - `overconfident`: the same confidences, right with probability confidence**4 (a 0.9 is right 66% of
      the time);
    - `separable`: see SEPARABLE_ERRORS; validation sets of a few dozen images are usually separable.
    """
    if distribution in ("calibrated", "overconfident"):
        confidence = rng.beta(6.0, 1.0, shape)
        power = 1.0 if distribution == "calibrated" else 4.0
        return confidence, rng.random(shape) < confidence**power
    if distribution == "separable":
        right = rng.random(shape) >= SEPARABLE_ERRORS
        high = right | (rng.random(shape) < SEPARABLE_HIDDEN)
        return np.where(high, rng.uniform(0.9, 1.0, shape), rng.uniform(0.5, 0.9, shape)), right
    raise ValueError(f"unknown distribution {distribution!r}: use calibrated, overconfident or separable")


def separable_share(confidence: np.ndarray, right: np.ndarray) -> float:
    """The share of rows whose wrong answers all score below every right one (rows without an error count)."""
    lowest_right = np.where(right, confidence, np.inf).min(axis=1)
    highest_wrong = np.where(right, -np.inf, confidence).max(axis=1)
    return float(np.mean(highest_wrong < lowest_right))


def todays_rule(confidence: np.ndarray, right: np.ndarray, target: float) -> np.ndarray:
    """Per row, the lowest confidence level whose answered images reach `target` (above all when none does)."""
    order = np.argsort(-confidence, axis=1, kind="stable")
    levels = np.take_along_axis(confidence, order, axis=1)
    precision = np.cumsum(np.take_along_axis(right, order, axis=1), axis=1) / np.arange(1, confidence.shape[1] + 1)
    level_end = np.append(levels[:, 1:] != levels[:, :-1], np.ones((len(levels), 1), bool), axis=1)
    meets = (precision >= target) & level_end
    lowest = confidence.shape[1] - 1 - np.argmax(meets[:, ::-1], axis=1)
    chosen = levels[np.arange(len(levels)), lowest]
    return np.where(meets.any(axis=1), chosen, np.nextafter(levels[:, 0], 2.0))


@dataclass(frozen=True)
class Outcome:
    failure_rate: float  # share of draws whose answered test images fall below the target
    answering_rate: float  # share of draws where the threshold answers some test image
    mean_coverage: float  # mean share of test images answered


def on_new_images(
    distribution: str, thresholds: dict[str, np.ndarray], target: float, rng: np.random.Generator, test_images: int
) -> dict[str, Outcome]:
    """Apply each rule's per-draw thresholds to one fresh test set per draw of `test_images` from the same
    distribution (every rule is measured on the same new images)."""
    totals = {name: np.zeros(3) for name in thresholds}  # failures, answering, coverage
    draws = len(next(iter(thresholds.values())))
    for start in range(0, draws, 100):  # 100 draws at a time bounds the memory
        rows = min(100, draws - start)
        confidence, right = draw(distribution, rng, (rows, test_images))
        for name, chosen in thresholds.items():
            answered = confidence >= chosen[start : start + rows, None]
            count, hits = answered.sum(axis=1), (answered & right).sum(axis=1)
            totals[name] += [
                np.sum((count > 0) & (hits < target * count)),
                np.sum(count > 0),
                np.sum(count) / test_images,
            ]
    return {name: Outcome(*(total / draws)) for name, total in totals.items()}
