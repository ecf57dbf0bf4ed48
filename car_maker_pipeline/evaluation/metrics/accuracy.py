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
