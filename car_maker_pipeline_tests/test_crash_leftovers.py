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


def test_orphan_clean_up_deletes_only_provably_dead_runs_of_its_own_instance(tmp_path):
    """Two real Dagster instances on one MLflow store. An MLflow run is deleted only when it has no live
    writer: its writer's pid is dead on this host, or its writer is elsewhere and its Dagster run has
    finished in *this* instance. Another instance's run id means nothing here, so its run is kept.

    | writer                    | Dagster run (as instance A sees it)  | A's clean-up |
    |---------------------------|--------------------------------------|--------------|
    | this host, pid dead       | another instance's (unknown to A)    | deleted      |
    | this host, pid alive      | A's, finished                        | kept         |
    | this host, pid alive      | another instance's                   | kept (the defect: it was deleted, with its version) |
    | another host              | A's, finished                        | deleted      |
    | another host              | A's, still running                   | kept         |
    | another host              | another instance's                   | kept         |
    """
    import dagster as dg
    import mlflow

    from car_maker_pipeline.mlflow_store import default_tracking_uri
    from car_maker_pipeline.tracking import WRITER_TAG, delete_orphaned_runs, experiment_id
    from car_maker_pipeline.tracking import dagster_run_status as status_in

    uri = default_tracking_uri(tmp_path)
    experiment = experiment_id(uri, tmp_path)
    client = mlflow.MlflowClient(uri)
    host = socket.gethostname()
    instance_a, instance_b = dg.DagsterInstance.ephemeral(), dg.DagsterInstance.ephemeral()

    job = dg.GraphDefinition("scoring").to_job()

    def dagster_run(instance, finished: bool) -> str:
        run = instance.create_run_for_job(job)
        if finished:
            instance.report_run_failed(run)
        return run.run_id

    finished_a, running_a, live_b = (
        dagster_run(instance_a, True),
        dagster_run(instance_a, False),
        dagster_run(instance_b, False),
    )
    cases = {
        "dead-writer": (f"{_dead_pid()}@{host}", live_b, True),
        "live-writer-finished-run": (f"{os.getpid()}@{host}", finished_a, False),
        "live-writer-other-instance": (f"{os.getpid()}@{host}", live_b, False),
        "other-host-finished": (f"{_dead_pid()}@another-pod", finished_a, True),
        "other-host-running": (f"{_dead_pid()}@another-pod", running_a, False),
        "other-host-other-instance": (f"{_dead_pid()}@another-pod", live_b, False),
    }
    tags = {"model_key": "tiny-s", "stage": "checkpoint_accuracy"}
    runs = {
        name: client.create_run(experiment, tags={**tags, "dagster_run_id": run, WRITER_TAG: writer}).info.run_id
        for name, (writer, run, _) in cases.items()
    }
    client.create_registered_model("car-maker-tiny-s")  # the live run of the other instance has registered v1
    client.create_model_version("car-maker-tiny-s", tmp_path.as_uri(), run_id=runs["live-writer-other-instance"])
    deleted = set(delete_orphaned_runs(uri, experiment, tags, status_in(instance_a)))
    assert deleted == {runs[name] for name, (_, _, gone) in cases.items() if gone}
    assert [str(v.version) for v in client.search_model_versions("name = 'car-maker-tiny-s'")] == ["1"]
    assert status_in(instance_b)(live_b) == "running" and status_in(instance_a)(live_b) == "unknown"
