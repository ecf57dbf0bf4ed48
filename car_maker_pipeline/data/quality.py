"""Quality checks on a built maker dataset; plain functions returning (passed, details) for asset checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from car_maker_pipeline.data.dataset_spec import TEST, TRAIN, VALIDATION, column

if TYPE_CHECKING:
    import datasets


def check_no_test_leakage(dataset: datasets.DatasetDict) -> tuple[bool, dict]:
    """No test image (by decoded-pixel hash) also appears in train or validation."""
    seen = set(column(dataset[TRAIN], "content_hash")) | set(column(dataset[VALIDATION], "content_hash"))
    shared = sorted(set(column(dataset[TEST], "content_hash")) & seen)
    return not shared, {"shared_images": len(shared), "examples": shared[:5]}


def check_test_makers_seen_in_train(dataset: datasets.DatasetDict) -> tuple[bool, dict]:
    missing = sorted(set(column(dataset[TEST], "maker")) - set(column(dataset[TRAIN], "maker")))
    return not missing, {"test_makers_missing_from_train": missing}


def check_no_empty_split(dataset: datasets.DatasetDict) -> tuple[bool, dict]:
    empty = sorted(name for name, part in dataset.items() if part.num_rows == 0)
    return not empty, {"empty_splits": empty, "rows": {name: part.num_rows for name, part in dataset.items()}}


def check_maker_list_matches_data(dataset: datasets.DatasetDict) -> tuple[bool, dict]:
    """The maker label names are exactly the makers that occur in the data."""
    declared = list(dataset[TRAIN].features["maker_id"].names)
    present = sorted(set().union(*(set(column(part, "maker")) for part in dataset.values())))
    return declared == present, {"declared": declared, "present": present}


# The blocking checks, by the name Dagster shows: a dataset is made current only when all pass.
BLOCKING_CHECKS = {
    "no_test_leakage": (check_no_test_leakage, "No test image (by decoded-pixel hash) is also in train or validation."),
    "test_makers_seen_in_train": (check_test_makers_seen_in_train, "Every maker in test has training images."),
    "no_empty_split": (check_no_empty_split, "No split is empty."),
    "maker_list_matches_data": (
        check_maker_list_matches_data,
        "The maker label list is exactly the set of makers in the data.",
    ),
}


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    details: dict

    def summary(self, limit: int = 200) -> str:
        """`name (key=value, ...)`, cut to `limit` characters: for a one-line failure message."""
        text = ", ".join(f"{key}={value}" for key, value in self.details.items())
        return f"{self.name} ({text[:limit] + '...' if len(text) > limit else text})"


def run_checks(dataset: datasets.DatasetDict) -> list[CheckOutcome]:
    return [CheckOutcome(name, *check(dataset)) for name, (check, _) in BLOCKING_CHECKS.items()]
