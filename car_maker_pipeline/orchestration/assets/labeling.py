"""Labeling: extra labeled images joining the dataset, and the review queue that asks for them."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.orchestration.deployment import OWNERS
from car_maker_pipeline.orchestration.metadata import typed_table
from car_maker_pipeline.orchestration.resources import StoreResource
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import LABELED_ADDITIONS, RAW_STANFORD_CARS, PipelineStore

REFUSED_ROWS_SHOWN = 200  # rows of the refused table kept in the materialization (all are beside each batch)


class AdditionsFolder(dg.ConfigurableResource):
    """The folder `labeled_additions` ingests and `additions_sensor` watches."""

    path: str | None = Field(default=None, description="Folder of labeled batches (default: CAR_MAKER_HOME/additions).")

    def folder(self, store: PipelineStore) -> Path:
        from car_maker_pipeline.labeling.additions import ADDITIONS_FOLDER

        return Path(self.path).expanduser() if self.path else store.root / ADDITIONS_FOLDER


@dg.asset(
    name=LABELED_ADDITIONS,
    group_name="data",
    code_version=code_version(LABELED_ADDITIONS),
    owners=OWNERS,
    deps=[RAW_STANFORD_CARS],
    kinds={"parquet"},
    description=(
        "Batches of extra labeled images from the additions folder (resource `additions`): a folder per label, "
        "a CSV of path,label, or a Label Studio JSON export. Each batch is identified by its content and stored "
        "once, whole; each row is accepted, or refused with its reason (unknown label, undecodable, too large, "
        "outside the batch, duplicate in the batch or of any source image). car_maker_dataset adds the accepted "
        "rows to train (or validation, for a batch whose split.txt says so)."
    ),
)
def labeled_additions(
    context: dg.AssetExecutionContext, store: StoreResource, additions: AdditionsFolder
) -> dg.MaterializeResult:
    import pandas as pd

    from car_maker_pipeline.data.added_rows import SourceIndex
    from car_maker_pipeline.data.source import RawDataset
    from car_maker_pipeline.labeling.additions import REFUSED_COLUMNS, AdditionsError, ingest_additions

    pipeline_store = store.get()
    root = pipeline_store.asset_dir(LABELED_ADDITIONS)
    folder = additions.folder(pipeline_store)
    with pipeline_store.lock(LABELED_ADDITIONS):
        index = SourceIndex.cached(RawDataset.current(pipeline_store), root / "source_index")
        try:
            result = ingest_additions(folder, root / "batches", index)
        except AdditionsError as error:
            raise dg.Failure(description=str(error), allow_retries=False) from None
        pipeline_store.write_manifest(LABELED_ADDITIONS, result.to_json())
    batches = pd.DataFrame(
        [
            {
                "batch_id": b.batch_id,
                "name": b.name,
                "layout": b.layout,
                "split": b.split,
                "rows": b.rows,
                "accepted": b.accepted,
                "refused": b.rows - b.accepted,
                "new": b.batch_id in result.new,
            }
            for b in result.batches
        ],
        columns=["batch_id", "name", "layout", "split", "rows", "accepted", "refused", "new"],
    )
    refused = pd.DataFrame(result.refused[:REFUSED_ROWS_SHOWN], columns=REFUSED_COLUMNS)
    context.log.info(f"{len(result.batches)} batch(es) in {folder}, {len(result.new)} new: {result.new}")
    return dg.MaterializeResult(
        metadata={
            "folder": dg.MetadataValue.path(str(folder)),
            "num_batches": len(result.batches),
            "new_batches": dg.MetadataValue.json(result.new),
            "accepted_rows": int(batches["accepted"].sum()),
            "refused_count": len(result.refused),
            "batches": typed_table(batches),
            "refused_rows": typed_table(refused),
            "skipped_copies": dg.MetadataValue.json(result.skipped_copies),
        },
        data_version=content_version([[b.batch_id, b.split] for b in result.batches]),
    )


labeling_assets = [labeled_additions]
