"""Labeling: extra labeled images joining the dataset, and the review queue that asks for them."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.data.tasks import MAKER, TaskError
from car_maker_pipeline.orchestration.assets.serving import IncomingImages
from car_maker_pipeline.orchestration.deployment import OWNERS
from car_maker_pipeline.orchestration.metadata import image_markdown, typed_table
from car_maker_pipeline.orchestration.partitions import model_and_task, model_partitions
from car_maker_pipeline.orchestration.resources import StoreResource
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import (
    CAR_MAKER_DATASET,
    LABELED_ADDITIONS,
    MAKER_PREDICTIONS,
    RAW_STANFORD_CARS,
    REVIEW_QUEUE,
    PipelineStore,
)

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
        raw = RawDataset.current(pipeline_store)  # read first: no source, no additions
        try:
            result = ingest_additions(folder, root / "batches", lambda: SourceIndex.cached(raw, root / "source_index"))
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


class ReviewQueueConfig(dg.Config):
    max_items: int = Field(default=50, gt=0, description="Images in the queue (the highest-ranked readable ones).")


@dg.asset(
    name=REVIEW_QUEUE,
    group_name="labeling",
    code_version=code_version(REVIEW_QUEUE),
    owners=OWNERS,
    deps=[MAKER_PREDICTIONS, CAR_MAKER_DATASET],
    partitions_def=model_partitions,
    kinds={"json", "csv"},
    description=(
        "The incoming images the champion doubts most, for a person to label: `unsure` answers first, then by the "
        "acquisition score (1 - margin between the two best makers) x sqrt(rarity of the top maker in train). "
        "Written as Label Studio tasks (image inline, the model's answer pre-filled), a CSV and a contact sheet; "
        "a reviewed export dropped into the additions folder becomes a batch."
    ),
)
def review_queue(
    context: dg.AssetExecutionContext,
    config: ReviewQueueConfig,
    store: StoreResource,
    incoming_images: IncomingImages,
) -> dg.MaterializeResult:
    import pandas as pd

    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.labeling.review_queue import SHEET_FILE, write_review_queue

    pipeline_store = store.get()
    key, task = model_and_task(context.partition_key)
    if task != MAKER:
        # Reviewers label makers (labeled_additions); a class-task queue would pre-fill answers they cannot keep.
        raise TaskError(
            f"review_queue ranks the maker task's doubts, and partition {context.partition_key} is the {task.name!r} "
            f"task; materialize it for '{key}|{MAKER.name}' (after maker_predictions for that partition)"
        )
    predicted = pipeline_store.read_manifest(MAKER_PREDICTIONS, key)
    dataset = MakerDataset.current(pipeline_store)
    out_dir = pipeline_store.asset_dir(REVIEW_QUEUE, key) / f"{predicted['fingerprint']}-{config.max_items}"
    queue = write_review_queue(
        pd.read_parquet(predicted["path"]),
        incoming_images.folder(pipeline_store),
        out_dir,
        train_counts=dataset.images_per_maker.get("train", {}),
        makers=dataset.makers,
        model=predicted["model"],
        predictions_path=predicted["path"],
        max_items=config.max_items,
    )
    pipeline_store.write_manifest(REVIEW_QUEUE, queue.to_json(), partition=key)
    table = pd.read_csv(Path(queue.path) / "queue.csv")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(queue.path),
            "model": queue.model,
            "queued": queue.queued,
            "unsure": queue.unsure,
            "candidates": queue.candidates,
            "queue": typed_table(table.head(REFUSED_ROWS_SHOWN)),
            "contact_sheet": image_markdown(Path(queue.path) / SHEET_FILE, "review queue"),
        },
        data_version=content_version(
            {"predictions": predicted["path"], "dataset": dataset.path, "max": config.max_items}
        ),
    )


labeling_assets = [labeled_additions, review_queue]
