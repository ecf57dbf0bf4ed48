"""Figures for people: the confusion matrix and a grid of misclassified images (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and MLflow, never to a screen
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from car_maker_pipeline.evaluation.metrics.accuracy import confusion_matrix


def confusion_figure(predictions: pd.DataFrame, makers: list[str], title: str):
    matrix = confusion_matrix(predictions, makers)
    size = max(4.0, 0.35 * len(makers) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(makers)), makers, rotation=90, fontsize=7)
    axis.set_yticks(range(len(makers)), makers, fontsize=7)
    axis.set_xlabel("predicted maker")
    axis.set_ylabel("true maker")
    axis.set_title(title)
    if len(makers) <= 15:
        for (row, col), value in np.ndenumerate(matrix):
            if value:
                axis.text(
                    col,
                    row,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black",
                )
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


def misclassified_figure(predictions: pd.DataFrame, images, title: str, limit: int = 16):
    """`images[i]` is the PIL image of predictions row `index == i`."""
    wrong = predictions[predictions["true_maker"] != predictions["predicted_maker"]].head(limit)
    columns = 4
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (_, row) in zip(axes.flat, wrong.iterrows()):
        axis.imshow(images[int(row["index"])])
        axis.set_title(f"true {row['true_maker']}\npred {row['predicted_maker']} ({row['score']:.2f})", fontsize=8)
    if wrong.empty:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def save_figure(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
