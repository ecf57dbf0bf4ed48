"""Hierarchical selective classification: name the class when sure, else the maker, else say "unsure".

The rule is the climbing rule of Goren, Galil & El-Yaniv, "Hierarchical Selective Classification"
(NeurIPS 2024) on the two-level tree of Stanford Cars (class -> maker). A maker's probability is the sum
of its classes' (calibrated) probabilities, so it is never below the probability of any of its classes:
climbing from the class to its maker can only gain confidence, and trades specificity for it.

- level "class": the most probable class, when its probability >= the class threshold;
- level "maker": otherwise the most probable maker, when its probability >= the maker threshold;
- level "unsure": otherwise. A class answer is right when it is the true class, a maker answer when it is
  the true class's maker.

Both thresholds come from validation images for one target precision, with the guarantee of
`certification.py` (Learn then Test): each class threshold of a grid fixed in advance (`CLASS_GRID`) is
paired with the maker threshold that fixed-sequence tests certify for the answers of both levels
together, every pair at delta / (grid size x comparisons) (Bonferroni), so with probability >= 1 - delta
every certified pair keeps the target on new images, and so does the one chosen. The pair chosen answers
the most information: a class answer counts 1, a maker answer 1 - log(classes of the maker) / log(all
classes) (how much of the tree it rules out, the paper's information-based coverage), "unsure" 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from car_maker_pipeline.evaluation.metrics.accuracy import wilson_interval
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError, label_indices, probability_matrix
from car_maker_pipeline.evaluation.metrics.certification import (
    NOTHING_ANSWERED,
    check_comparisons,
    check_delta,
    fixed_sequence_search,
    percent,
)
from car_maker_pipeline.evaluation.metrics.selective import CURVE_COLUMNS, check_target_precision, risk_coverage

LEVELS = ("class", "maker", "unsure")
# Class thresholds tried, label-free and fixed in advance; NOTHING_ANSWERED tries answering makers only.
CLASS_GRID = (NOTHING_ANSWERED, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
METHOD = (
    "climbing rule (Goren, Galil & El-Yaniv 2024), thresholds certified by Learn then Test over "
    f"{len(CLASS_GRID)} class thresholds (Bonferroni)"
)
_ALWAYS = 2.0  # a confidence above every probability: the images a class threshold answers at class level


@dataclass(frozen=True)
class ClassTree:
    """Classes (the score columns, in order) and the maker each belongs to."""

    classes: tuple[str, ...]
    makers: tuple[str, ...]
    maker_index: tuple[int, ...]  # per class: its maker's position in `makers`

    @classmethod
    def from_class_makers(cls, classes, makers_of_classes, makers=None) -> ClassTree:
        """`makers_of_classes[i]` is the maker of `classes[i]`; `makers` fixes the maker order (default: sorted)."""
        classes, owners = tuple(classes), list(makers_of_classes)
        if len(classes) != len(owners) or not classes:
            raise CalibrationError(f"need one maker per class, got {len(classes)} classes and {len(owners)} makers")
        if len(set(classes)) != len(classes):
            raise CalibrationError("class names must be unique; the same name twice cannot be two score columns")
        makers = tuple(makers) if makers is not None else tuple(sorted(set(owners)))
        unknown = sorted(set(owners) - set(makers))
        if unknown:
            raise CalibrationError(f"classes belong to makers {unknown} that the maker list {list(makers)} lacks")
        position = {maker: i for i, maker in enumerate(makers)}
        return cls(classes, makers, tuple(position[owner] for owner in owners))

    def membership(self) -> np.ndarray:
        """(classes, makers) 0/1 matrix: class probabilities @ membership = maker probabilities."""
        matrix = np.zeros((len(self.classes), len(self.makers)))
        matrix[np.arange(len(self.classes)), list(self.maker_index)] = 1.0
        return matrix

    def maker_probabilities(self, class_probabilities) -> np.ndarray:
        probabilities = self._checked(class_probabilities)
        return probabilities @ self.membership()

    def maker_information(self) -> np.ndarray:
        """Per maker: 1 - log(its classes) / log(all classes); a class answer is worth 1."""
        sizes = np.bincount(list(self.maker_index), minlength=len(self.makers)).astype(np.float64)
        if len(self.classes) == 1:
            return np.ones(len(self.makers))
        return 1.0 - np.log(np.maximum(sizes, 1.0)) / math.log(len(self.classes))

    def _checked(self, class_probabilities) -> np.ndarray:
        probabilities = probability_matrix(class_probabilities)
        if probabilities.shape[1] != len(self.classes):
            raise CalibrationError(
                f"probabilities have {probabilities.shape[1]} columns but the tree has {len(self.classes)} classes; "
                "pass one column per class, in the class order of the dataset"
            )
        return probabilities


@dataclass(frozen=True)
class Climbed:
    """Per image: the level answered (0 class, 1 maker, 2 unsure), the most probable class and maker, and
    the confidence of each."""

    level: np.ndarray
    class_index: np.ndarray
    maker_index: np.ndarray
    class_confidence: np.ndarray
    maker_confidence: np.ndarray

    def correct(self, tree: ClassTree, true_class) -> np.ndarray:
        """Right at the level answered (False for "unsure")."""
        truth = label_indices(true_class, len(self.level), len(tree.classes))
        true_maker = np.asarray(tree.maker_index)[truth]
        return np.where(
            self.level == 0, self.class_index == truth, (self.level == 1) & (self.maker_index == true_maker)
        )

    def answers(self, tree: ClassTree) -> list[str]:
        """The answer per image: a class name, a maker name, or "unsure"."""
        return [
            tree.classes[c] if level == 0 else tree.makers[m] if level == 1 else "unsure"
            for level, c, m in zip(self.level, self.class_index, self.maker_index)
        ]


def climb(class_probabilities, tree: ClassTree, class_threshold: float, maker_threshold: float) -> Climbed:
    probabilities = tree._checked(class_probabilities)
    maker_probabilities = probabilities @ tree.membership()
    class_index, maker_index = probabilities.argmax(axis=1), maker_probabilities.argmax(axis=1)
    rows = np.arange(len(probabilities))
    class_confidence, maker_confidence = probabilities[rows, class_index], maker_probabilities[rows, maker_index]
    return Climbed(
        _levels(class_confidence, maker_confidence, class_threshold, maker_threshold),
        class_index,
        maker_index,
        class_confidence,
        maker_confidence,
    )


def _levels(class_confidence, maker_confidence, class_threshold: float, maker_threshold: float) -> np.ndarray:
    return np.where(class_confidence >= class_threshold, 0, np.where(maker_confidence >= maker_threshold, 1, 2))


@dataclass(frozen=True)
class HierarchicalThresholds:
    """The certified pair; when `certified` is False both lie above every probability (all "unsure")."""

    class_threshold: float
    maker_threshold: float
    target_precision: float
    delta: float
    comparisons: int
    certified: bool
    class_answered: int  # on the validation images the pair was certified on
    maker_answered: int
    errors: int
    images: int

    def statement(self) -> str:
        target, confidence = percent(self.target_precision), percent(1 - self.delta)
        if not self.certified:
            return (
                f"{target} precision cannot be certified at {confidence} confidence with {self.images} validation "
                f"images at either level ({METHOD}); every answer is 'unsure'. Add validation images or lower the target."
            )
        return (
            f"{target} precision is certified: with probability {confidence}, at least {target} of the class and "
            f"maker answers are right on new images like these ({self.class_answered} class and "
            f"{self.maker_answered} maker answers of {self.images} validation images, {self.errors} wrong; {METHOD})."
        )

    def to_json(self) -> dict:
        return asdict(self)


def fit_thresholds(
    class_probabilities, true_class, tree: ClassTree, target_precision: float, delta: float, comparisons: int = 1
) -> HierarchicalThresholds:
    """The (class, maker) threshold pair certified on these validation images that answers the most information."""
    target, delta, comparisons = (
        check_target_precision(target_precision),
        check_delta(delta),
        check_comparisons(comparisons),
    )
    probabilities = tree._checked(class_probabilities)
    climbed = climb(probabilities, tree, NOTHING_ANSWERED, NOTHING_ANSWERED)
    truth = label_indices(true_class, len(probabilities), len(tree.classes))
    class_right = climbed.class_index == truth
    maker_right = climbed.maker_index == np.asarray(tree.maker_index)[truth]
    nothing = HierarchicalThresholds(
        NOTHING_ANSWERED, NOTHING_ANSWERED, target, delta, comparisons, False, 0, 0, 0, len(probabilities)
    )
    if not len(probabilities):
        return nothing
    grid = np.asarray(CLASS_GRID)[:, None]
    at_class = climbed.class_confidence[None, :] >= grid  # (grid, images)
    found = fixed_sequence_search(
        np.where(at_class, _ALWAYS, climbed.maker_confidence[None, :]),
        np.where(at_class, class_right[None, :], maker_right[None, :]),
        target,
        delta,
        comparisons * len(CLASS_GRID),
    )
    information = tree.maker_information()[climbed.maker_index]
    best, best_value = None, -1.0
    for row, class_threshold in enumerate(CLASS_GRID):
        if not found["certified"][row]:
            continue
        maker_threshold = float(found["threshold"][row])
        maker_threshold = NOTHING_ANSWERED if maker_threshold > 1 else maker_threshold
        level = _levels(climbed.class_confidence, climbed.maker_confidence, class_threshold, maker_threshold)
        value = float((level == 0).sum() + information[level == 1].sum())
        if value > best_value:  # ties keep the earlier, stricter class threshold
            best_value = value
            best = HierarchicalThresholds(
                float(class_threshold),
                maker_threshold,
                target,
                delta,
                comparisons,
                True,
                int((level == 0).sum()),
                int((level == 1).sum()),
                int(found["errors"][row]),
                len(probabilities),
            )
    return best or nothing


def level_table(class_probabilities, true_class, tree: ClassTree, thresholds: HierarchicalThresholds) -> pd.DataFrame:
    """The share of images answered at each level and the precision there (Wilson 95%); the row "answered"
    is class and maker together, the figure the target is promised for."""
    climbed = climb(class_probabilities, tree, thresholds.class_threshold, thresholds.maker_threshold)
    right = climbed.correct(tree, true_class)
    images = len(climbed.level)
    rows = []
    for name, mask in (
        ("class", climbed.level == 0),
        ("maker", climbed.level == 1),
        ("answered", climbed.level < 2),
        ("unsure", climbed.level == 2),
    ):
        count, hits = int(mask.sum()), int(right[mask].sum())
        low, high = wilson_interval(hits, count) if name != "unsure" and count else (math.nan, math.nan)
        rows.append(
            {
                "level": name,
                "images": count,
                "share": count / images if images else math.nan,
                "correct": hits,
                "precision": hits / count if count and name != "unsure" else math.nan,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def climbing_curve(class_probabilities, true_class, tree: ClassTree) -> pd.DataFrame:
    """The hierarchical risk-coverage curve: one threshold for both levels, every level worth considering,
    most confident first (`selective.CURVE_COLUMNS`, plus the share answered at class level)."""
    climbed = climb(class_probabilities, tree, NOTHING_ANSWERED, NOTHING_ANSWERED)
    truth = label_indices(true_class, len(climbed.level), len(tree.classes))
    class_right = climbed.class_index == truth
    maker_right = climbed.maker_index == np.asarray(tree.maker_index)[truth]
    thresholds = np.unique(np.concatenate([climbed.class_confidence, climbed.maker_confidence]))[::-1]
    images = len(climbed.level)
    columns = {column: [] for column in (*CURVE_COLUMNS, "class_share")}
    for theta in thresholds:
        at_class = climbed.class_confidence >= theta
        at_maker = ~at_class & (climbed.maker_confidence >= theta)
        answered = int(at_class.sum() + at_maker.sum())
        if not answered:
            continue
        hits = int(class_right[at_class].sum() + maker_right[at_maker].sum())
        for column, value in zip(
            columns, (float(theta), answered, answered / images, hits / answered, at_class.sum() / images)
        ):
            columns[column].append(value)
    return pd.DataFrame(columns).astype({"answered": "int64"})


def hierarchical_risk_coverage_png(
    class_probabilities, true_class, tree: ClassTree, path, title: str, target=None
) -> Path:
    """The climbing curve beside the flat class-only and maker-only curves on the same images."""
    from car_maker_pipeline.evaluation.metrics.selective import risk_coverage_png

    climbed = climb(class_probabilities, tree, NOTHING_ANSWERED, NOTHING_ANSWERED)
    truth = label_indices(true_class, len(climbed.level), len(tree.classes))
    curves = {
        "class, then maker (climbing)": climbing_curve(class_probabilities, truth, tree),
        "class only": risk_coverage(climbed.class_confidence, climbed.class_index == truth),
        "maker only (summed classes)": risk_coverage(
            climbed.maker_confidence, climbed.maker_index == np.asarray(tree.maker_index)[truth]
        ),
    }
    return risk_coverage_png(curves, path, title, target)
