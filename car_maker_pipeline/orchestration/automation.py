"""Scheduled retraining, and sensors that retrain when the source changes or a labeled batch arrives.

All ship stopped (default_status STOPPED): nothing trains by surprise. Start them in the UI
(Automation tab) or with `dagster schedule start retrain_weekly` / `dagster sensor start
source_revision_sensor`; the daemon (`dagster dev` starts one) runs them.
"""

import os
import time

import dagster as dg

from car_maker_pipeline.data.tasks import MAKER
from car_maker_pipeline.orchestration.assets.labeling import AdditionsFolder
from car_maker_pipeline.orchestration.partitions import model_and_task, model_partitions
from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource
from car_maker_pipeline.store import (
    LABELED_ADDITIONS,
    LORA_CHECKPOINTS,
    RAW_STANFORD_CARS,
    MissingUpstreamError,
    PipelineStore,
)

RETRAIN_CRON_ENV = "CAR_MAKER_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.groups("data", "training", "evaluation"),
    partitions_def=model_partitions,
    description="Rebuild the dataset, fine-tune one model for one task (a partition) and score its checkpoints.",
)


def retrain_partitions(store: PipelineStore) -> list[str]:
    """What retraining retrains: every model's maker task, and the class task of the models already trained on
    it (a lora_checkpoints manifest for it), so no schedule starts a task nobody asked for."""
    keys = []
    for key in model_partitions.get_partition_keys():
        model, task = model_and_task(key)
        if task == MAKER or store.manifest_path(LORA_CHECKPOINTS, task.partition(model)).exists():
            keys.append(str(key))
    return keys


def _retrain_requests(store: PipelineStore, tags: dict[str, str], key_suffix: str) -> list[dg.RunRequest]:
    return [
        dg.RunRequest(run_key=f"{key_suffix}:{key}", partition_key=key, tags=tags) for key in retrain_partitions(store)
    ]


@dg.schedule(
    name="retrain_weekly",
    job=retrain_job,
    cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        f"Retrain every model once a week (cron from {RETRAIN_CRON_ENV}, default '{DEFAULT_RETRAIN_CRON}'): the maker "
        "task, and the class task where it was trained before."
    ),
)
def retrain_weekly(context: dg.ScheduleEvaluationContext, store: StoreResource):
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
    return _retrain_requests(store.get(), {"trigger": "schedule", "scheduled_for": tick}, key_suffix=tick)


@dg.sensor(
    name="source_revision_sensor",
    job=retrain_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Retrain when the source's revision (Hub commit or local content fingerprint) changes; once per revision.",
)
def source_revision_sensor(context: dg.SensorEvaluationContext, source: StanfordCarsSource, store: StoreResource):
    from car_maker_pipeline.data.source import resolve_revision
    from car_maker_pipeline.data.source_schema import SourceError

    try:
        revision = resolve_revision(source.resolve(store.get()), source.revision)
    except SourceError as error:
        return dg.SkipReason(f"Could not read the source revision: {error}")
    # Before the first tick, what is already materialized counts as seen: starting the sensor
    # must not retrain on data the pipeline already has.
    known = context.cursor or _materialized_revision(store.get())
    if revision == known:
        return dg.SensorResult(skip_reason=f"Source unchanged at {revision}.", cursor=revision)
    return dg.SensorResult(
        run_requests=_retrain_requests(
            store.get(), {"trigger": "source_revision", "source_revision": revision}, key_suffix=revision
        ),
        cursor=revision,
    )


def _materialized_revision(store: PipelineStore) -> str | None:
    try:
        return store.read_manifest(RAW_STANFORD_CARS)["revision"]
    except Exception:
        return None


def _ingested_batches(store: PipelineStore) -> set[str]:
    try:
        return {batch["batch_id"] for batch in store.read_manifest(LABELED_ADDITIONS)["batches"]}
    except MissingUpstreamError:
        return set()


@dg.sensor(
    name="additions_sensor",
    job=retrain_job,
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=(
        "Retrain every model when a new labeled batch is in the additions folder: labeled_additions, "
        "car_maker_dataset, lora_checkpoints and checkpoint_accuracy, once per set of batches; the runs' tags name them."
    ),
)
def additions_sensor(context: dg.SensorEvaluationContext, store: StoreResource, additions: AdditionsFolder):
    from car_maker_pipeline.labeling.batch_files import BatchError, list_batches
    from car_maker_pipeline.serving.batch import SETTLE_SECONDS

    pipeline_store = store.get()
    folder = additions.folder(pipeline_store)
    try:
        batches = list_batches(folder)  # each batch fingerprinted by content: a changed file is a new batch
    except BatchError as error:
        return dg.SkipReason(f"{error} The sensor tries again at its next tick.")
    new = [batch for batch in batches if batch.batch_id not in _ingested_batches(pipeline_store)]
    if not new:
        return dg.SkipReason(f"No new batch in {folder} ({len(batches)} already ingested).")
    if time.time() - max(batch.newest_mtime for batch in new) < SETTLE_SECONDS:
        return dg.SkipReason(f"A batch in {folder} changed within {SETTLE_SECONDS:.0f} s; waiting for copies to end.")
    ids = sorted(batch.batch_id for batch in new)
    key = ",".join(ids)
    if key == context.cursor:
        return dg.SkipReason(f"Retraining on {key} was already requested.")
    tags = {
        "trigger": "labeled_additions",
        "additions_batches": key,
        "additions_names": ",".join(batch.name for batch in new)[:200],
    }
    return dg.SensorResult(run_requests=_retrain_requests(pipeline_store, tags, key_suffix=key), cursor=key)


automation_jobs = [retrain_job]
schedules = [retrain_weekly]
sensors = [source_revision_sensor, additions_sensor]
