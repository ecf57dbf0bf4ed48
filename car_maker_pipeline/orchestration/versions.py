"""Code versions of the assets and data versions of what they produce, so Dagster can say what is stale.

Dagster marks an asset stale when the code version of its last materialization is not the current
one, or when an upstream asset's data version has changed since ("upstream data changed"), and
"Materialize stale" rebuilds just those. So a rebuilt dataset shows every model trained or scored on
the old one as stale, and so does a new default prompt or a new evaluation rule, in the UI and for
`dagster asset materialize --select 'stale'`-style automation.

- A code version is the asset's revision, kept here and bumped by hand when the asset's output
  changes for the same inputs (the maker dataset's is its build version), joined, for the assets whose
  result depends on it, with a digest of the default prompt: a new prompt is new code for them.
- A data version names content, never a run: the source revision, the dataset folder (source revision
  and build parameters), a digest of an evaluation's inputs, the checkpoints' adapter digests, the
  registered version served. Materializing again with nothing changed gives the same data version,
  so nothing downstream turns stale.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from car_maker_pipeline.data.dataset_spec import BUILD_VERSION
from car_maker_pipeline.model_inputs.prompt import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_PROMPT
from car_maker_pipeline.store import (
    BASELINE_EVALUATION,
    CAR_MAKER_DATASET,
    CHECKPOINT_ACCURACY,
    LABELED_ADDITIONS,
    LORA_CHECKPOINTS,
    LORA_SWEEP,
    MAKER_PREDICTIONS,
    MERGED_MODEL,
    RAW_STANFORD_CARS,
    REVIEW_QUEUE,
)

REVISIONS = {
    RAW_STANFORD_CARS: 1,
    CAR_MAKER_DATASET: BUILD_VERSION,
    BASELINE_EVALUATION: 1,
    LORA_CHECKPOINTS: 1,
    LORA_SWEEP: 1,
    CHECKPOINT_ACCURACY: 1,
    MERGED_MODEL: 1,
    MAKER_PREDICTIONS: 1,
    LABELED_ADDITIONS: 1,
    REVIEW_QUEUE: 1,
}
PROMPTED = {BASELINE_EVALUATION, LORA_CHECKPOINTS, LORA_SWEEP, CHECKPOINT_ACCURACY}


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version(asset: str) -> str:
    version = f"r{REVISIONS[asset]}"
    if asset in PROMPTED:
        version += "-prompt-" + digest({"system": DEFAULT_SYSTEM_PROMPT, "user": DEFAULT_USER_PROMPT})[:8]
    return version


def content_version(payload) -> dg.DataVersion:
    """A data version that names `payload` (any JSON-able description of the content)."""
    return dg.DataVersion(digest(payload))
