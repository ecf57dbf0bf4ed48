"""Accuracy with honest uncertainty: Wilson intervals, macro accuracy, per-maker tables, confusion."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; well-behaved at 0%, 100% and small n."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class AccuracySummary:
    num_images: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    macro_accuracy: float

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}accuracy_ci_low": self.ci_low,
            f"{prefix}accuracy_ci_high": self.ci_high,
            f"{prefix}macro_accuracy": self.macro_accuracy,
            f"{prefix}num_images": float(self.num_images),
        }


def as_maker_columns(predictions: pd.DataFrame, true_column: str, predicted_column: str) -> pd.DataFrame:
    """Another task's predictions (the class task's true_class / predicted_class) under the maker columns the
    accuracy tables read: accuracy of the class task is then class accuracy, with the same code."""
    return predictions.rename(columns={true_column: "true_maker", predicted_column: "predicted_maker"})


def per_maker_table(predictions: pd.DataFrame, makers: list[str]) -> pd.DataFrame:
    """One row per maker: images, correct, accuracy (recall) and its Wilson interval."""
    rows = []
    for maker in makers:
        subset = predictions[predictions["true_maker"] == maker]
        correct = int((subset["predicted_maker"] == maker).sum())
        low, high = wilson_interval(correct, len(subset))
        rows.append(
            {
                "maker": maker,
                "images": len(subset),
                "correct": correct,
                "accuracy": correct / len(subset) if len(subset) else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def summarize(predictions: pd.DataFrame, makers: list[str]) -> AccuracySummary:
    total = len(predictions)
    correct = int((predictions["true_maker"] == predictions["predicted_maker"]).sum())
    low, high = wilson_interval(correct, total)
    table = per_maker_table(predictions, makers)
    present = table[table["images"] > 0]
    macro = float(present["accuracy"].mean()) if len(present) else float("nan")
    return AccuracySummary(total, correct, correct / total if total else float("nan"), low, high, macro)


def confusion_matrix(predictions: pd.DataFrame, makers: list[str]) -> np.ndarray:
    index = {maker: i for i, maker in enumerate(makers)}
    matrix = np.zeros((len(makers), len(makers)), dtype=np.int64)
    for true, predicted in zip(predictions["true_maker"], predictions["predicted_maker"]):
        matrix[index[true], index[predicted]] += 1
    return matrix


# --- the class task: what a buyer reads besides class accuracy ------------------------------------------


def _named_pairs(true_classes, predicted_classes, maker_of) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    true, predicted = np.asarray(true_classes, dtype=object), np.asarray(predicted_classes, dtype=object)
    if true.shape != predicted.shape or true.ndim != 1:
        raise ValueError(
            f"need one true and one predicted class per image, got shapes {true.shape} and {predicted.shape}"
        )
    unknown = sorted({str(name) for name in (*true, *predicted) if name not in maker_of})
    if unknown:
        raise ValueError(
            f"classes {unknown[:5]} have no maker in the class list; pass the dataset's class -> maker map"
        )
    true_makers = np.array([maker_of[name] for name in true], dtype=object)
    predicted_makers = np.array([maker_of[name] for name in predicted], dtype=object)
    return true, predicted, true_makers, predicted_makers


def class_task_summary(true_classes, predicted_classes, maker_of) -> dict[str, float]:
    """Class accuracy, the maker accuracy the class answers imply (the predicted class's maker), and the share
    of images with the right maker but the wrong model, each with its Wilson interval."""
    true, predicted, true_makers, predicted_makers = _named_pairs(true_classes, predicted_classes, maker_of)
    images = len(true)
    counts = {
        "class_accuracy": int((true == predicted).sum()),
        "implied_maker_accuracy": int((true_makers == predicted_makers).sum()),
        "right_maker_wrong_model": int(((true_makers == predicted_makers) & (true != predicted)).sum()),
    }
    summary: dict[str, float] = {"num_images": float(images)}
    for name, count in counts.items():
        low, high = wilson_interval(count, images)
        summary |= {name: count / images if images else math.nan, f"{name}_ci_low": low, f"{name}_ci_high": high}
    return summary


def per_class_accuracy(true_classes, predicted_classes, classes) -> pd.DataFrame:
    """One row per class with images: images, correct, accuracy and its Wilson interval, worst first (ties:
    more images first, then by name), so the classes to fix lead the table."""
    true, predicted = np.asarray(true_classes, dtype=object), np.asarray(predicted_classes, dtype=object)
    rows = []
    for name in classes:
        mask = true == name
        images, correct = int(mask.sum()), int((predicted[mask] == name).sum())
        if images:
            low, high = wilson_interval(correct, images)
            rows.append(
                {
                    "class": name,
                    "images": images,
                    "correct": correct,
                    "accuracy": correct / images,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    table = pd.DataFrame(rows, columns=["class", "images", "correct", "accuracy", "ci_low", "ci_high"])
    return table.sort_values(["accuracy", "images", "class"], ascending=[True, False, True], kind="stable").reset_index(
        drop=True
    )


def confused_pairs_within_maker(true_classes, predicted_classes, maker_of, top: int = 10) -> pd.DataFrame:
    """The most frequent (true class, predicted class) mistakes between two classes of the same maker: the
    model mix-ups, apart from maker errors. `share` is the part of the true class's images lost to it."""
    true, predicted, true_makers, predicted_makers = _named_pairs(true_classes, predicted_classes, maker_of)
    columns = ["maker", "true_class", "predicted_class", "images", "share"]
    mixed = (true != predicted) & (true_makers == predicted_makers)
    if not mixed.any():
        return pd.DataFrame(
            {column: pd.Series(dtype=object if column.endswith(("class", "maker")) else float) for column in columns}
        ).astype({"images": "int64"})
    frame = pd.DataFrame({"maker": true_makers[mixed], "true_class": true[mixed], "predicted_class": predicted[mixed]})
    pairs = frame.value_counts().rename("images").reset_index()
    per_class = pd.Series(true).value_counts()
    pairs["share"] = pairs["images"] / pairs["true_class"].map(per_class)
    pairs = pairs.sort_values(
        ["images", "share", "true_class", "predicted_class"], ascending=[False, False, True, True]
    )
    return pairs[columns].head(top).reset_index(drop=True)
