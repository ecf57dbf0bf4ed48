"""What a Stanford-Cars-shaped source must look like, and the error every source reader raises.

Kept apart from the readers (`source`, `local_source`, `staging`) so that each of them can check a
split, or refuse one, without importing another reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a split is checked: this module's error class is imported far more widely
    import datasets

REQUIRED_COLUMNS = ("image", "label")


class SourceError(ValueError):
    """The source dataset is missing, unreachable or not shaped like Stanford Cars."""


def check_features(features: datasets.Features, columns: list[str], split: str, source: str, where: str = "") -> None:
    """Stanford-Cars shape of one split (or one file of it): an Image column and a ClassLabel label column."""
    import datasets

    file_note = f" ({where})" if where else ""
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise SourceError(
            f"Split {split!r} of source {source!r} lacks column(s) {missing}; it has {list(columns)}{file_note}. "
            "A Stanford-Cars-shaped source has an 'image' column and a 'label' ClassLabel column."
        )
    if not isinstance(features["label"], datasets.ClassLabel):
        raise SourceError(
            f"Column 'label' of split {split!r} in source {source!r} is {features['label']!r}, "
            f"not a ClassLabel{file_note}; the class names (make, model, year) are needed to derive makers."
        )
    if not isinstance(features["image"], datasets.Image):
        raise SourceError(f"Column 'image' of split {split!r} in source {source!r} is not an Image feature{file_note}.")


def validate_source(dataset: datasets.DatasetDict, source: str) -> None:
    """Stanford-Cars shape: an image column, a ClassLabel label column, no empty split."""
    if not dataset:
        raise SourceError(f"The source {source!r} has no splits.")
    for split, part in dataset.items():
        check_features(part.features, part.column_names, split, source)
        if part.num_rows == 0:
            raise SourceError(f"Split {split!r} of source {source!r} is empty; every split needs rows.")
