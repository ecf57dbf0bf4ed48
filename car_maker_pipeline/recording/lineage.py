"""Which data an MLflow run saw, recorded with `mlflow.log_input` so the MLflow UI shows it per run.

Each split of the maker dataset is logged as a dataset named `car_maker_dataset/<split>`: its rows
and schema (the maker column and each image's pixel hash, not the pixels), the stored dataset as
source, the split as context, and the source revision (Hub commit or local content fingerprint) as
its digest, so two runs trained or scored on the same source revision show the same dataset.
A dataset with labeled additions takes its folder's digest instead (source, parameters and batches),
and each batch it holds is logged too, as `labeled_additions/<batch id>` (its rows, the split it
joined as context), so the MLflow UI lists every batch a run saw.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from car_maker_pipeline.data.maker_dataset import TEST, TRAIN, VALIDATION, column
from car_maker_pipeline.tracking import mlflow_run

# MLflow stores a dataset digest in at most 36 characters; a Hub commit sha has 40.
MAX_DIGEST_LENGTH = 36
RECORDED_COLUMNS = ("maker", "content_hash")


def dataset_name(split: str) -> str:
    return f"car_maker_dataset/{split}"


def log_dataset_inputs(record, splits: tuple[str, ...] = (TRAIN, VALIDATION, TEST)) -> None:
    """Log `splits` of the maker dataset `record` as inputs of the active MLflow run.

    Call it in every run that reads the data: training (train, validation), checkpoint scoring
    (validation, test; train too where the run also registers the model it trained).
    """
    import mlflow
    import pandas as pd

    dataset = record.load()
    additions = getattr(record, "additions", None) or []
    digest = record.source_revision if not additions else hashlib.sha256(Path(record.path).name.encode()).hexdigest()
    tags = {"source_revision": record.source_revision}
    for split in splits:
        part = dataset[split]
        frame = pd.DataFrame({name: column(part, name) for name in RECORDED_COLUMNS if name in part.column_names})
        mlflow.log_input(_dataset(frame, record.path, dataset_name(split), digest), context=split, tags=tags)
    for batch in additions:
        if batch["split"] not in splits:
            continue
        part = dataset[batch["split"]]
        rows = [i for i, provenance in enumerate(column(part, "provenance")) if provenance == batch["batch_id"]]
        frame = pd.DataFrame({name: column(part.select(rows), name) for name in RECORDED_COLUMNS})
        name = f"labeled_additions/{batch['batch_id']}"
        mlflow.log_input(_dataset(frame, record.path, name, batch["batch_id"]), context=batch["split"], tags=tags)


def _dataset(frame, source: str, name: str, digest: str):
    import mlflow

    with warnings.catch_warnings():
        # A local folder matches MLflow's local-artifact source twice over; either reading is right.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(
            frame, source=source, targets="maker", name=name, digest=digest[:MAX_DIGEST_LENGTH]
        )


def additions_note(record) -> str:
    """The labeled batches in a dataset, for a registered version's description ("" when none)."""
    additions = getattr(record, "additions", None) or []
    if not additions:
        return ""
    listed = ", ".join(f"{b['batch_id']} ({b['rows']} rows, {b['split']})" for b in additions)
    return f"Trained on source revision {record.source_revision} plus labeled batches: {listed}."


def record_training_inputs(record, uri: str, home, run_id: str) -> None:
    """Log what a finished training run saw (train, validation, each batch) into that run."""
    additions = getattr(record, "additions", None) or []
    tags = {"additions_batches": ",".join(b["batch_id"] for b in additions)} if additions else {}
    with mlflow_run(uri, home, run_name="", tags=tags, run_id=run_id):
        log_dataset_inputs(record, splits=(TRAIN, VALIDATION))
