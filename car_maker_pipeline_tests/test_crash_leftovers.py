"""What a process killed mid-write leaves behind, and how the next writer treats it."""

import json
import os
import socket
import subprocess
import sys

from car_maker_pipeline.storage import atomic_directory, remove_stale_temporaries, temporary_prefix, write_json_atomic


def _dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(process.stdout)


def test_the_next_atomic_write_removes_dead_writers_temporaries_only(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".predictions.tmp-{_dead_pid()}@{host}@abc"  # killed before its rename
    dead.mkdir()
    live = tmp_path / f".other.tmp-{os.getppid()}@{host}@def"  # a writer that is still running
    live.mkdir()
    elsewhere = tmp_path / f".other.tmp-{_dead_pid()}@another-pod@ghi"  # pids of other hosts mean nothing here
    elsewhere.mkdir()

    write_json_atomic(tmp_path / "current.json", {"ok": True})
    assert not dead.exists() and live.exists() and elsewhere.exists()
    assert json.loads((tmp_path / "current.json").read_text()) == {"ok": True}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name and p not in (live, elsewhere)]


def test_atomic_directory_names_its_temporary_after_its_writer(tmp_path):
    with atomic_directory(tmp_path / "built") as tmp:
        assert tmp.name.startswith(temporary_prefix("built"))
        assert remove_stale_temporaries(tmp_path) == []  # our own, alive
    assert (tmp_path / "built").is_dir() and not tmp.exists()


def test_buffered_loss_points_survive_a_line_cut_by_a_kill(tmp_path):
    from car_maker_pipeline.training.mlflow_callback import MlflowLossCallback

    pending = tmp_path / "mlflow_pending.jsonl"
    pending.write_text('["train_loss", 2.5, 1000, 10]\n["val_loss", 2.1, 1001, 10]\n["train_lo')
    callback = MlflowLossCallback("run", "sqlite:///unused.db", pending_path=pending)
    assert callback.pending_points() == [("train_loss", 2.5, 1000, 10), ("val_loss", 2.1, 1001, 10)]


def test_an_mlflow_run_of_a_killed_command_is_deleted_although_its_dagster_run_looks_alive(tmp_path):
    """A SIGKILLed `dagster asset materialize` leaves its Dagster run STARTED: the run's writer tells."""
    import mlflow

    from car_maker_pipeline.mlflow_store import default_tracking_uri
    from car_maker_pipeline.tracking import WRITER_TAG, delete_orphaned_runs, experiment_id

    uri = default_tracking_uri(tmp_path)
    experiment = experiment_id(uri, tmp_path)
    client = mlflow.MlflowClient(uri)
    tags = {"model_key": "tiny-s", "stage": "baseline"}
    host = socket.gethostname()
    writers = {
        "killed": f"{_dead_pid()}@{host}",
        "running": f"{os.getpid()}@{host}",
        "other_host": f"{_dead_pid()}@another-pod",  # its pid means nothing here: kept
        "untagged": None,  # a run logged before writers were tagged: the Dagster status decides
    }
    runs = {
        name: client.create_run(
            experiment, tags={**tags, "dagster_run_id": name, **({WRITER_TAG: writer} if writer else {})}
        ).info.run_id
        for name, writer in writers.items()
    }
    deleted = delete_orphaned_runs(uri, experiment, tags, status_of=lambda dagster_run_id: "running")
    assert deleted == [runs["killed"]]
    assert client.get_run(runs["killed"]).info.lifecycle_stage == "deleted"
    assert all(
        client.get_run(runs[name]).info.lifecycle_stage == "active" for name in ("running", "other_host", "untagged")
    )


def test_writer_ids_name_this_process_and_a_dead_one_is_recognised():
    from car_maker_pipeline.storage import writer_alive, writer_id

    assert writer_id() == f"{os.getpid()}@{socket.gethostname()}" and writer_alive(writer_id())
    assert not writer_alive(f"{_dead_pid()}@{socket.gethostname()}")
    assert writer_alive(f"{_dead_pid()}@another-host") and writer_alive(None) and writer_alive("garbled")


def test_orphan_clean_up_deletes_only_records_of_steps_that_can_no_longer_commit(tmp_path):
    """Two real Dagster instances on one MLflow store. A step's MLflow run is its record once the step has
    materialized the partition and succeeded; before that, a kill (or a failure after logging) leaves a run
    that the re-executed step would duplicate. A run is deleted only when its step provably cannot commit any more:
    its writer's pid is dead on this host, or its Dagster run has finished in *this* instance (for a run
    still RUNNING: finished, and its writer elsewhere). Another instance's run id means nothing here.

    | MLflow run | writer             | Dagster run (as instance A sees it)            | A's clean-up |
    |------------|--------------------|------------------------------------------------|--------------|
    | running    | this host, dead    | another instance's (unknown to A)              | deleted      |
    | running    | this host, alive   | A's, finished                                  | kept         |
    | running    | this host, alive   | another instance's                             | kept         |
    | running    | another host       | A's, finished                                  | deleted      |
    | running    | another host       | A's, still running                             | kept         |
    | running    | another host       | another instance's                             | kept         |
    | running    | this host, dead    | A's, materialized the partition (end lost)     | kept         |
    | ended      | this host, dead    | A's, left STARTED by the kill, nothing stored  | deleted (the defect: kept, so the rerun made two) |
    | ended      | this host, alive   | A's, running (about to store it)               | kept         |
    | ended      | another host       | A's, running                                   | kept         |
    | ended      | another host       | A's, failed before materializing               | deleted      |
    | ended      | this host, dead    | A's, materialized the partition                | kept         |
    | ended      | this host, dead    | A's, materialized it, then its step failed     | deleted      |
    | ended      | this host, dead    | A's, materialized it, then failed on a later asset | kept     |
    | ended      | this host, dead    | A's, materialized only another partition       | deleted      |
    | ended      | this host, dead    | another instance's                             | kept         |
    """
    import dagster as dg
    import mlflow

    from car_maker_pipeline.mlflow_store import default_tracking_uri
    from car_maker_pipeline.orchestration.run_history import run_status
    from car_maker_pipeline.tracking import WRITER_TAG, delete_orphaned_runs, experiment_id

    uri = default_tracking_uri(tmp_path)
    experiment = experiment_id(uri, tmp_path)
    client = mlflow.MlflowClient(uri)
    host = socket.gethostname()
    dead, alive, elsewhere = f"{_dead_pid()}@{host}", f"{os.getpid()}@{host}", f"{_dead_pid()}@another-pod"
    instance_a, instance_b = dg.DagsterInstance.ephemeral(), dg.DagsterInstance.ephemeral()

    job = dg.GraphDefinition("scoring").to_job()

    def dagster_run(instance, finished: bool) -> str:
        run = instance.create_run_for_job(job)
        if finished:
            instance.report_run_failed(run)
        return run.run_id

    partitions = dg.StaticPartitionsDefinition(["tiny-s", "tiny-m"])

    @dg.asset(name="checkpoint_accuracy", partitions_def=partitions)
    def scored() -> None:
        return None

    @dg.asset(name="checkpoint_accuracy", partitions_def=partitions)
    def scored_then_failed():  # what a kill between storing the materialization and the step's success leaves
        yield dg.MaterializeResult()
        raise RuntimeError("the step fails after its materialization was stored")

    @dg.asset(partitions_def=partitions, deps=[scored])
    def later() -> None:
        raise RuntimeError("fails after checkpoint_accuracy was materialized")

    def materialized(assets, partition: str) -> str:
        return dg.materialize(assets, instance=instance_a, partition_key=partition, raise_on_error=False).run_id

    finished_a, running_a, live_b = (
        dagster_run(instance_a, True),
        dagster_run(instance_a, False),
        dagster_run(instance_b, False),
    )
    committed = materialized([scored], "tiny-s")
    committed_then_failed = materialized([scored, later], "tiny-s")
    other_partition = materialized([scored], "tiny-m")
    step_failed = materialized([scored_then_failed], "tiny-s")
    assert instance_a.get_run_by_id(committed_then_failed).status == dg.DagsterRunStatus.FAILURE
    cases = {  # name: (ended, writer, Dagster run, deleted)
        "running/dead-writer": (False, dead, live_b, True),
        "running/live-writer-finished-run": (False, alive, finished_a, False),
        "running/live-writer-other-instance": (False, alive, live_b, False),
        "running/other-host-finished": (False, elsewhere, finished_a, True),
        "running/other-host-running": (False, elsewhere, running_a, False),
        "running/other-host-other-instance": (False, elsewhere, live_b, False),
        "running/committed": (False, dead, committed, False),
        "ended/killed-before-materializing": (True, dead, running_a, True),
        "ended/live-writer": (True, alive, running_a, False),
        "ended/other-host-running": (True, elsewhere, running_a, False),
        "ended/other-host-failed": (True, elsewhere, finished_a, True),
        "ended/committed": (True, dead, committed, False),
        "ended/committed-then-failed": (True, dead, committed_then_failed, False),
        "ended/materialized-then-step-failed": (True, dead, step_failed, True),
        "ended/other-partition-only": (True, dead, other_partition, True),
        "ended/other-instance": (True, dead, live_b, False),
    }
    tags = {"model_key": "tiny-s", "stage": "checkpoint_accuracy"}
    runs = {}
    for name, (ended, writer, run, _) in cases.items():
        runs[name] = client.create_run(experiment, tags={**tags, "dagster_run_id": run, WRITER_TAG: writer}).info.run_id
        if ended:
            client.set_terminated(runs[name], "FINISHED")
    client.create_registered_model("car-maker-tiny-s")  # the live run of the other instance has registered v1
    client.create_model_version(
        "car-maker-tiny-s", tmp_path.as_uri(), run_id=runs["running/live-writer-other-instance"]
    )
    client.create_model_version("car-maker-tiny-s", tmp_path.as_uri(), run_id=runs["ended/killed-before-materializing"])
    status_in_a = run_status(instance_a, dg.AssetKey("checkpoint_accuracy"), "tiny-s")
    deleted = set(delete_orphaned_runs(uri, experiment, tags, status_in_a))
    assert {name for name, run in runs.items() if run in deleted} == {
        name for name, (*_, gone) in cases.items() if gone
    }
    assert [str(v.version) for v in client.search_model_versions("name = 'car-maker-tiny-s'")] == ["1"]
    assert run_status(instance_b, dg.AssetKey("checkpoint_accuracy"), "tiny-s")(live_b) == "running"
    assert status_in_a(live_b) == "unknown" and status_in_a(committed) == "committed"
