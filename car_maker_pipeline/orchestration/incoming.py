"""A sensor that classifies newly arrived images: one `maker_predictions` run per model and task, per new file set.

It ships stopped (default_status STOPPED); start it in the UI (Automation tab) or with
`dagster sensor start incoming_images_sensor -w workspace.yaml`. Each tick fingerprints the incoming
folder (names, sizes, modification times). A file set is classified once per model that has a
champion (`car-maker-<model>` and `car-class-<model>` alike): the cursor and the run keys carry the fingerprint, and a set that `maker_predictions`
already classified (by `make demo`, or by hand) counts as done. While a file changed within the
last 30 s the tick waits, so a copy in progress is not classified half-written.
"""

import dagster as dg

from car_maker_pipeline.orchestration.assets.serving import IncomingImages
from car_maker_pipeline.orchestration.jobs import serving_job
from car_maker_pipeline.orchestration.partitions import model_and_task, model_partitions
from car_maker_pipeline.orchestration.resources import StoreResource
from car_maker_pipeline.store import CHECKPOINT_ACCURACY, MAKER_PREDICTIONS, MissingUpstreamError, PipelineStore


def _has_champion(store: PipelineStore, key: str) -> bool:
    """checkpoint_accuracy registered a version for this model and task, and the first registered version is champion."""
    model, task = model_and_task(key)
    try:
        return bool(store.read_manifest(CHECKPOINT_ACCURACY, task.partition(model)).get("registered_version"))
    except MissingUpstreamError:
        return False


def _classified_fingerprint(store: PipelineStore, key: str) -> str | None:
    model, task = model_and_task(key)
    try:
        return store.read_manifest(MAKER_PREDICTIONS, task.partition(model)).get("fingerprint")
    except MissingUpstreamError:
        return None


@dg.sensor(
    name="incoming_images_sensor",
    job=serving_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Classify the incoming-images folder with each model's champion when its files change; once per file set.",
)
def incoming_images_sensor(context: dg.SensorEvaluationContext, store: StoreResource, incoming_images: IncomingImages):
    from car_maker_pipeline.serving.batch import SETTLE_SECONDS, snapshot

    pipeline_store = store.get()
    seen = snapshot(incoming_images.folder(pipeline_store))
    if not seen.files:
        return dg.SkipReason(f"{seen.folder} holds no files.")
    if seen.fingerprint == context.cursor:
        return dg.SkipReason(f"No change in {seen.folder} ({len(seen.files)} files, {seen.fingerprint}).")
    if seen.settling():
        return dg.SkipReason(
            f"A file in {seen.folder} changed within {SETTLE_SECONDS:.0f} s; waiting for copies to end."
        )
    models = [str(key) for key in model_partitions.get_partition_keys() if _has_champion(pipeline_store, key)]
    if not models:
        # The cursor stays put, so these files are classified once a model has a champion.
        return dg.SkipReason("No model has a registered champion yet; materialize checkpoint_accuracy first.")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"{seen.fingerprint}:{key}",
                partition_key=key,
                asset_selection=[dg.AssetKey(MAKER_PREDICTIONS)],
                tags={"trigger": "incoming_images", "incoming_fingerprint": seen.fingerprint},
            )
            for key in models
            if _classified_fingerprint(pipeline_store, key) != seen.fingerprint
        ],
        cursor=seen.fingerprint,
    )


sensors = [incoming_images_sensor]
