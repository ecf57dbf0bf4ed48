"""Commands started at the same time: the instance is created once, and one whole dataset is left.

| case                                                                        | expected                                              |
|-----------------------------------------------------------------------------|-------------------------------------------------------|
| the Makefile's `init` command twice at once on a fresh DAGSTER_HOME         | both succeed; runs, event-log index and schedule databases and the project's dagster.yaml in place |
| `init` on a DAGSTER_HOME that has its own dagster.yaml                      | that file is kept                                     |
| `init` on an instance an earlier race left with two schema stamps          | fails with a message saying what happened and what to delete |
| two builds of the same maker dataset at once (threads), a reader polling    | one builds, the other reuses its folder; the reader never fails; the manifest names a whole folder |
| a folder replaced by `atomic_directory`                                     | the old version is deleted only after the new one is in place, never at the path readers use |
| a filesystem that cannot lock (flock answers ENOLCK, simulated)             | the guarded work runs anyway, with a warning          |
| (slow) `init`, then two `dagster asset materialize --select raw_stanford_cars,car_maker_dataset` at once | both runs succeed; one dataset folder, loadable, matching its record; no temporaries left |
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import datasets
import pytest

from car_maker_pipeline.data.maker_dataset import MakerDataset, MakerDatasetParams
from car_maker_pipeline.data.promotion import build_and_promote_maker_dataset
from car_maker_pipeline.storage import atomic_directory
from car_maker_pipeline.store import CAR_MAKER_DATASET, RAW_STANFORD_CARS, MissingUpstreamError, PipelineStore
from car_maker_pipeline_tests.support.cli import REPO, cli_env, cli_instance, materialize_command

DATABASES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


def project_init_command() -> list[str]:
    """`make init`'s command line (read with `make -n`), run by this interpreter."""
    printed = subprocess.run(["make", "-s", "-n", "init"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(next(line for line in printed.splitlines() if "car_maker_pipeline" in line))
    argv[0] = sys.executable  # the Makefile's .venv/bin/python, or whichever environment runs the tests
    return argv


def run_init_commands(env: dict[str, str], count: int) -> list[subprocess.CompletedProcess]:
    processes = [
        subprocess.Popen(project_init_command(), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(count)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read().decode(), None) for p in processes]


def test_two_inits_at_once_create_the_instance_once(tmp_path):
    env = cli_env(tmp_path)
    home = Path(env["DAGSTER_HOME"])

    results = run_init_commands(env, 2)

    assert [result.returncode for result in results] == [0, 0], "\n".join(result.stdout for result in results)
    assert all((home / database).is_file() for database in DATABASES)
    assert (home / "dagster.yaml").read_text() == (REPO / "dagster.yaml").read_text()


def test_init_keeps_an_operators_own_dagster_yaml(tmp_path):
    env = cli_env(tmp_path)
    own = "telemetry:\n  enabled: false\n"
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text(own)

    [result] = run_init_commands(env, 1)

    assert result.returncode == 0, result.stdout
    assert (Path(env["DAGSTER_HOME"]) / "dagster.yaml").read_text() == own


def test_an_instance_broken_by_an_earlier_race_is_reported_with_what_to_do(tmp_path):
    """What two first commands at once left behind before `make init` existed: two schema stamps."""
    env = cli_env(tmp_path)
    [first] = run_init_commands(env, 1)
    assert first.returncode == 0, first.stdout
    with sqlite3.connect(Path(env["DAGSTER_HOME"]) / "history" / "runs.db") as db:
        db.execute("INSERT INTO alembic_version VALUES ('5771160a95ad')")  # an older revision, as the race left it

    [again] = run_init_commands(env, 1)

    assert again.returncode != 0
    assert (
        "two commands created them at the same time" in again.stdout and f"delete {env['DAGSTER_HOME']}" in again.stdout
    )


def test_two_builds_of_one_dataset_at_once_leave_one_whole_folder(tmp_path, raw_dataset):
    store = PipelineStore(tmp_path / "home")
    store.write_manifest(RAW_STANFORD_CARS, raw_dataset.to_json())
    params = MakerDatasetParams(validation_fraction=0.2, seed=1, num_proc=1)
    promotions, reader_errors, reads = [], [], []
    done = threading.Event()

    def build():
        promotions.append(build_and_promote_maker_dataset(store, params))

    def read():  # what a downstream asset does, over and over while the builds run
        while not done.wait(0.01):
            try:
                record = MakerDataset.current(store)
            except MissingUpstreamError:  # not made current yet
                continue
            try:
                reads.append(
                    sum(part.num_rows for part in record.load().values()) == sum(record.rows_per_split.values())
                )
            except Exception as error:  # noqa: BLE001 - any failure here is what the test looks for
                reader_errors.append(repr(error))

    reader = threading.Thread(target=read)
    reader.start()
    builders = [threading.Thread(target=build) for _ in range(2)]
    for thread in builders:
        thread.start()
    for thread in builders:
        thread.join()
    done.set()
    reader.join()

    assert reader_errors == [] and all(reads)
    assert sorted(promotion.dataset.cache_hit for promotion in promotions) == [False, True]
    assert all(promotion.promoted for promotion in promotions)
    folders = [path for path in store.asset_dir(CAR_MAKER_DATASET).iterdir() if path.is_dir()]
    assert folders == [Path(MakerDataset.current(store).path)], "a second folder or a leftover temporary"


def test_a_replaced_folder_is_deleted_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    import car_maker_pipeline.storage as storage

    final = tmp_path / "versioned"
    new_files = sorted(f"new-{index}" for index in range(50))
    with atomic_directory(final) as tmp:
        for index in range(50):
            (tmp / f"old-{index}").write_text("old")
    deletions: list[tuple[Path, list[str]]] = []  # (folder being deleted, what `final` held at that moment)
    real_rmtree = storage.shutil.rmtree

    def spying_rmtree(path, *args, **kwargs):
        deletions.append((Path(path), sorted(p.name for p in final.iterdir())))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(storage.shutil, "rmtree", spying_rmtree)
    with atomic_directory(final) as tmp:
        for name in new_files:
            (tmp / name).write_text("new")

    assert deletions, "the old version was not deleted"
    assert all(path != final for path, _ in deletions), "the folder readers use was deleted in place"
    assert all(listing == new_files for _, listing in deletions)
    assert sorted(p.name for p in final.iterdir()) == new_files
    assert [p.name for p in tmp_path.iterdir()] == ["versioned"]


def test_on_a_filesystem_without_locks_the_work_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some network volumes answer flock with ENOLCK: the build must still run (simulated: no such volume here)."""
    import errno

    import car_maker_pipeline.locking as locking

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_locks)
    ran = []
    with locking.file_lock(tmp_path / "asset" / ".lock"):
        ran.append(True)
    assert ran == [True] and "does not support locks" in caplog.text


@pytest.mark.slow
def test_two_first_data_commands_at_once_after_init(tmp_path):
    env = cli_env(tmp_path)
    [init] = run_init_commands(env, 1)
    assert init.returncode == 0, init.stdout
    config = {
        "resources": {
            "source": {
                "config": {"demo_train_per_maker": 8, "demo_test_per_maker": 3, "demo_corruptions": ["contrast"]}
            }
        }
    }
    command = materialize_command("raw_stanford_cars,car_maker_dataset", config=config)
    processes = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=900)[0] for process in processes]

    assert [process.returncode for process in processes] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    assert all("RUN_SUCCESS" in output for output in outputs)
    assert not any("already exists" in output for output in outputs)
    home = Path(env["CAR_MAKER_HOME"])
    record = json.loads((home / CAR_MAKER_DATASET / "current.json").read_text())
    loaded = datasets.load_from_disk(record["path"])
    assert {split: part.num_rows for split, part in loaded.items()} == record["rows_per_split"]
    assert [p for p in (home / CAR_MAKER_DATASET).iterdir() if p.is_dir()] == [Path(record["path"])]
    assert not [p for p in home.rglob("*.tmp-*")], "temporaries left behind"
    # The two runs took turns: each asset was built by one and reused by the other.
    with cli_instance(env) as instance:
        for asset in (RAW_STANFORD_CARS, CAR_MAKER_DATASET):
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=10).records
            assert sorted(r.asset_materialization.metadata["cache_hit"].value for r in records) == [False, True], asset
