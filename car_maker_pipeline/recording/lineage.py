"""Which data an MLflow run saw, recorded with `mlflow.log_input` so the MLflow UI shows it per run.

Each split of the maker dataset is logged as a dataset named `car_maker_dataset/<split>`: its rows
and schema (the maker column and each image's pixel hash, not the pixels), the stored dataset as
source, the split as context, and the source revision (Hub commit or local content fingerprint) as
its digest, so two runs trained or scored on the same source revision show the same dataset.
"""

from __future__ import annotations

import warnings

from car_maker_pipeline.data.maker_dataset import TEST, TRAIN, VALIDATION, column

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
    for split in splits:
        part = dataset[split]
        frame = pd.DataFrame({name: column(part, name) for name in RECORDED_COLUMNS if name in part.column_names})
        with warnings.catch_warnings():
            # A local folder matches MLflow's local-artifact source twice over; either reading is right.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            logged = mlflow.data.from_pandas(
                frame,
                source=record.path,
                targets="maker",
                name=dataset_name(split),
                digest=record.source_revision[:MAX_DIGEST_LENGTH],
            )
        mlflow.log_input(logged, context=split, tags={"source_revision": record.source_revision})
