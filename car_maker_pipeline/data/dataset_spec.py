"""What a maker dataset is made of, without building one: its split names, its build parameters and
the version of the build rules.

Light on purpose (no `datasets`, numpy or pandas): Dagster imports the data assets, and so this
module, in every process that loads the definitions, most of which never build a dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

TRAIN, VALIDATION, TEST = "train", "validation", "test"
# Bumped when the build gives other rows or columns for the same source and parameters: a new dataset
# folder, and (as the asset's code version) downstream models shown stale in Dagster.
BUILD_VERSION = 4  # 4: the provenance column, and labeled additions joined to train/validation


@dataclass(frozen=True)
class MakerDatasetParams:
    validation_fraction: float = 0.1
    seed: int = 0
    num_proc: int | None = None  # None: one process per core for large sources

    def fingerprint(self) -> str:
        blob = json.dumps(
            {"validation_fraction": self.validation_fraction, "seed": self.seed, "v": BUILD_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


def column(part: datasets.Dataset, name: str) -> list:
    """One column as a Python list, read through Arrow: `part[name]` would decode every image of the row."""
    return part.with_format("arrow")[name].to_pylist()
