"""Figures for people: the confusion matrix and a grid of misclassified images (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and MLflow, never to a screen
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from car_maker_pipeline.evaluation.metrics.accuracy import confusion_matrix

FIGURE_DPI = 110  # every figure's pixels per inch in its PNG


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


# The misclassified grid: each picture shrunk into a cell of its own (never enlarged), its caption above it.
GRID_COLUMNS = 4
GRID_CELL = (256, 192)  # pixels: enough to tell one car from another at a glance
GRID_CAPTION = 34  # pixels above each picture for its two caption lines
GRID_TITLE = 36  # pixels above the grid for its title


def misclassified_figure(predictions: pd.DataFrame, images, title: str, limit: int = 16):
    """`images[i]` is the PIL image of predictions row `index == i`.

    The pictures are shrunk with PIL and pasted into one image shown at its own pixel size under a single
    set of axes: with a set of axes per picture and full-size photos resampled by matplotlib, this figure
    took about a second to draw (four with real photos), once per checkpoint and split.
    """
    wrong = predictions[predictions["true_maker"] != predictions["predicted_maker"]].head(limit)
    rows = max(1, -(-len(wrong) // GRID_COLUMNS))
    cell_width, cell_height = GRID_CELL
    row_height = GRID_CAPTION + cell_height
    width, height = GRID_COLUMNS * cell_width, GRID_TITLE + rows * row_height
    canvas = Image.new("RGB", (width, height), "white")
    captions = []
    for position, (_, row) in enumerate(wrong.iterrows()):
        grid_row, column = divmod(position, GRID_COLUMNS)
        picture = images[int(row["index"])].convert("RGB")
        picture.thumbnail(GRID_CELL)
        top = GRID_TITLE + grid_row * row_height
        canvas.paste(picture, (column * cell_width + (cell_width - picture.width) // 2, top + GRID_CAPTION))
        caption = f"true {row['true_maker']}\npred {row['predicted_maker']} ({row['score']:.2f})"
        captions.append((column * cell_width + cell_width / 2, top + 2, caption))
    figure = plt.figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_axis_off()
    axis.imshow(np.asarray(canvas), interpolation="none")
    for x, y, caption in captions:
        axis.text(x, y, caption, ha="center", va="top", fontsize=8)
    if wrong.empty:
        axis.text(width / 2, GRID_TITLE + row_height / 2, "no misclassified images", ha="center", va="center")
    axis.text(width / 2, 8, title, ha="center", va="top", fontsize=11)
    return figure


def save_figure(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path
