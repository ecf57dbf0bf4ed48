"""The weekly retraining schedule and the source-revision sensor, evaluated as the daemon would."""

import datetime
import shutil

import dagster as dg

from car_maker_pipeline.definitions import defs
from car_maker_pipeline.orchestration.automation import retrain_weekly, source_revision_sensor
from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource
from car_maker_pipeline.store import LORA_CHECKPOINTS, RAW_STANFORD_CARS


def test_schedule_ships_stopped_and_requests_one_retrain_per_model_and_trained_task(tmp_path):
    assert retrain_weekly.default_status == dg.DefaultScheduleStatus.STOPPED
    assert retrain_weekly.cron_schedule == "0 3 * * 1"
    when = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.UTC)
    store = StoreResource(home=str(tmp_path / "home"))

    def requests():
        with dg.build_schedule_context(scheduled_execution_time=when, resources={"store": store}) as context:
            return retrain_weekly(context)

    assert [r.partition_key for r in requests()] == ["tiny-s|maker", "tiny-m|maker", "tiny-l|maker"]
    assert all(r.tags["trigger"] == "schedule" for r in requests())
    # The class task is retrained only where it was trained before: tiny-m's class run left its manifest.
    store.get().write_manifest(LORA_CHECKPOINTS, {"global_step": 4}, partition="tiny-m@class")
    assert [r.partition_key for r in requests()] == ["tiny-s|maker", "tiny-m|maker", "tiny-m|class", "tiny-l|maker"]
    job = defs.resolve_job_def("retrain_job")
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} >= {
        "raw_stanford_cars",
        "car_maker_dataset",
        "lora_checkpoints",
        "checkpoint_accuracy",
    }


def test_sensor_fires_once_per_new_source_revision(demo_source, tmp_path):
    source_dir = tmp_path / "source"
    shutil.copytree(demo_source, source_dir)
    resources = {
        "source": StanfordCarsSource(path_or_id=str(source_dir)),
        "store": StoreResource(home=str(tmp_path / "home")),
    }
    assert source_revision_sensor.default_status == dg.DefaultSensorStatus.STOPPED

    with dg.build_sensor_context(resources=resources) as context:
        first = source_revision_sensor(context)
    assert len(first.run_requests) == 3
    revision = first.cursor
    assert revision.startswith("sha256-") and all(r.tags["source_revision"] == revision for r in first.run_requests)

    with dg.build_sensor_context(cursor=revision, resources=resources) as context:
        again = source_revision_sensor(context)
    assert not again.run_requests  # same revision: no second retrain

    (source_dir / "data" / "train-00000-of-00001.parquet").write_bytes(
        (source_dir / "data" / "train-00000-of-00001.parquet").read_bytes() + b"\0"
    )
    with dg.build_sensor_context(cursor=revision, resources=resources) as context:
        changed = source_revision_sensor(context)
    assert len(changed.run_requests) == 3 and changed.cursor != revision


def test_sensor_does_not_retrain_on_data_already_materialized(demo_source, tmp_path):
    from car_maker_pipeline.data.source import materialize_raw

    store = StoreResource(home=str(tmp_path / "home"))
    raw = materialize_raw(str(demo_source), store.get().root)
    store.get().write_manifest(RAW_STANFORD_CARS, raw.to_json())
    with dg.build_sensor_context(
        resources={"source": StanfordCarsSource(path_or_id=str(demo_source)), "store": store}
    ) as context:
        result = source_revision_sensor(context)
    assert not result.run_requests and result.cursor == raw.revision


def test_project_instance_settings(tmp_path):
    """The shipped dagster.yaml: one GPU step at a time, one more queued run starting up while it runs,
    crashed runs free their slot and are retried once."""
    import shutil
    from pathlib import Path

    import dagster as dg

    shutil.copy(Path(__file__).resolve().parents[1] / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert (
            instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
        )  # what the queue daemon reads
        assert instance.get_concurrency_config().run_queue_config.op_concurrency_slot_buffer == 1
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure


def test_the_postgres_deployment_keeps_the_project_operating_rules():
    """deploy/dagster.yaml differs from the embedded instance's settings in its storage only."""
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    project, deployed = (yaml.safe_load((repo / name).read_text()) for name in ("dagster.yaml", "deploy/dagster.yaml"))
    assert "storage" in deployed and "storage" not in project
    assert {key: value for key, value in deployed.items() if key != "storage"} == project


def test_additions_sensor_retrains_once_per_new_batch(tmp_path, raw_dataset):
    """Stopped by default; a new (settled) batch: one retrain_job run per model, tagged with the batch id;
    a batch still being copied, or one already ingested: no run."""
    import os
    import time

    from car_maker_pipeline.data.added_rows import SourceIndex
    from car_maker_pipeline.labeling.additions import ingest_additions
    from car_maker_pipeline.orchestration.assets.labeling import AdditionsFolder
    from car_maker_pipeline.orchestration.automation import additions_sensor
    from car_maker_pipeline.store import LABELED_ADDITIONS, PipelineStore

    assert additions_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    store = PipelineStore(tmp_path / "home")
    resources = {"store": StoreResource(home=str(store.root)), "additions": AdditionsFolder()}
    batch = store.root / "additions" / "monday" / "BMW"
    batch.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (16, 12), (200, 10, 30)).save(batch / "a.png")
    with dg.build_sensor_context(resources=resources) as context:
        assert isinstance(additions_sensor(context), dg.SkipReason)  # just copied: settling
    old = time.time() - 3600
    for path in (batch / "a.png", batch, batch.parent):
        os.utime(path, (old, old))
    with dg.build_sensor_context(resources=resources) as context:
        result = additions_sensor(context)
    assert [request.partition_key for request in result.run_requests] == [
        "tiny-s|maker",
        "tiny-m|maker",
        "tiny-l|maker",
    ]
    [batch_id] = {request.tags["additions_batches"] for request in result.run_requests}
    assert batch_id.startswith("batch-") and result.run_requests[0].tags["additions_names"] == "monday"
    assert result.cursor == batch_id
    ingested = ingest_additions(store.root / "additions", tmp_path / "batches", SourceIndex.of(raw_dataset.load()))
    store.write_manifest(LABELED_ADDITIONS, ingested.to_json())
    with dg.build_sensor_context(resources=resources, cursor=batch_id) as context:
        assert "No new batch" in str(additions_sensor(context))
