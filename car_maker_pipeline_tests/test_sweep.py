"""lora_sweep: an Optuna study of real LoRA runs, shared by processes, resumable, recorded in MLflow.

| case                                              | expected                                                  |
|---------------------------------------------------|-----------------------------------------------------------|
| two processes run one study at once (sqlite, and  | n_trials finished, numbered 0..n-1, each told once, both  |
|   PostgreSQL when its server is installed)        | processes contributed, no configuration drawn twice       |
| a sweep process killed (SIGKILL) mid-trial        | the rerun fails the stale trial and finishes n_trials     |
| a process killed after creating a trial, before   | the next process fails that trial (Optuna never would:    |
|   its first heartbeat                             | it has no heartbeat) and finishes n_trials, not waiting   |
| trials Optuna failed after their process died     | their MLflow runs, left RUNNING, closed as KILLED; runs   |
|                                                   | of live, finished or self-failed trials, or of another    |
|                                                   | study, untouched (table in the test)                      |
| a 3-trial sweep on tiny-s                          | trials trained for real, scored per checkpoint; MLflow    |
|                                                   | parent run + one child per trial; figures; best params in |
|                                                   | the manifest, where from_sweep reads them               |
| bad requests                                      | LoraTrainingError / ValueError naming the field, before   |
|                                                   | any training                                              |
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.search_space import SweepSettings, parse_search_space
from car_maker_pipeline.training.sweep import open_storage

REPO_ROOT = Path(__file__).resolve().parents[1]

# One process of a shared study: trials whose objective is cheap (what is tested is the sharing), each
# taking `delay` seconds, so the processes' trials overlap.
_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from car_maker_pipeline.training.search_space import SweepSettings
    from car_maker_pipeline.training.sweep import TrialOutcome, open_storage, run_study
    url, n_trials, delay, lock, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    settings = SweepSettings(n_trials=n_trials, heartbeat_interval_s=1, grace_period_s=3, pruner="none")
    def trial_fn(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        trial.set_user_attr("process", tag)
        time.sleep(delay)
        return TrialOutcome(1.0 - x * x, False)
    run_study("shared", open_storage(url, settings, lock), settings, lock, trial_fn)
    print("DONE", tag, flush=True)
    """
)


def _worker(url, n_trials, delay, lock, tag):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _WORKER, url, str(n_trials), str(delay), str(lock), tag]
    return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _storage_urls(tmp_path):
    yield f"sqlite:///{tmp_path / 'optuna.db'}"
    from car_maker_pipeline_tests.support.postgres import postgres_bin_dir

    if postgres_bin_dir() is not None:
        from car_maker_pipeline_tests.support.postgres import ThrowawayPostgres

        with ThrowawayPostgres() as pg:
            pg.create_database("optuna")
            yield pg.url("optuna").replace("postgresql://", "postgresql+psycopg://")


def test_two_processes_share_one_study_without_duplicates_or_lost_trials(tmp_path):
    for url in _storage_urls(tmp_path):
        workers = [_worker(url, 8, 0.4, tmp_path / "study.lock", tag) for tag in ("a", "b")]
        outputs = [worker.communicate(timeout=120)[0] for worker in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        trials = optuna.load_study(study_name="shared", storage=url).get_trials()
        assert [t.number for t in trials] == list(range(8))
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert {t.user_attrs["process"] for t in trials} == {"a", "b"}  # both contributed
        assert len({t.params["x"] for t in trials}) == 8  # the per-trial seed: no configuration drawn twice


def test_a_killed_sweep_resumes_and_the_killed_trial_fails_without_counting(tmp_path):
    url, lock = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "study.lock"
    first = _worker(url, 4, 3.0, lock, "killed")
    deadline = time.monotonic() + 60
    storage = open_storage(
        url, SweepSettings(heartbeat_interval_s=1, grace_period_s=3), lock
    )  # the worker creates it too
    while True:  # kill it in its second trial, the first being told
        assert time.monotonic() < deadline and first.poll() is None
        try:
            trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
        except KeyError:
            trials = []
        if len(trials) == 2 and trials[0].state == TrialState.COMPLETE:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    rerun = _worker(url, 4, 0.1, lock, "rerun")
    output = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, output
    trials = optuna.load_study(study_name="shared", storage=url).get_trials()
    states = [t.state for t in trials]
    assert states[1] == TrialState.FAIL  # the killed one
    assert states.count(TrialState.COMPLETE) == 4 and len(trials) == 5
    assert [t.user_attrs["process"] for t in trials if t.number >= 2] == ["rerun"] * 3


@pytest.mark.parametrize("orphaned", [1, 3])
def test_a_trial_whose_creator_died_before_its_first_heartbeat_does_not_block_the_study(tmp_path, orphaned):
    """What a SIGKILL between `ask()` and the first heartbeat leaves: a RUNNING trial without any heartbeat,
    which Optuna's stale-trial check skips; `orphaned` of them, one per killed process, before the next one starts."""
    import threading

    from car_maker_pipeline.training.sweep import TrialOutcome, load_study, run_study

    settings = SweepSettings(n_trials=2, heartbeat_interval_s=1, grace_period_s=3, pruner="none")
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", settings)
    orphans = [load_study("shared", storage, settings).ask().number for _ in range(orphaned)]
    done = []
    thread = threading.Thread(
        target=lambda: done.append(
            run_study("shared", storage, settings, tmp_path / "study.lock", lambda t: TrialOutcome(t.number, False))
        ),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=60)
    assert done, "run_study still waits for trials nobody runs"
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert [t.state for t in trials if t.number in orphans] == [TrialState.FAIL] * len(orphans)
    assert [t.state for t in trials if t.number not in orphans] == [TrialState.COMPLETE] * 2


# (study, trial's state in Optuna, its MLflow run's status, closed as KILLED)
DEAD_TRIAL_RUNS = [
    ("this", "COMPLETE", "FINISHED", False),
    ("this", "FAIL", "RUNNING", True),  # its process was killed; a later process failed the trial
    ("this", "FAIL", "FAILED", False),  # its own process failed it and closed the run
    ("this", "RUNNING", "RUNNING", False),  # alive in another process
    ("this", "PRUNED", "FINISHED", False),
    ("this", "FAIL", "RUNNING", True),
    ("other", "FAIL", "RUNNING", False),  # another study's run, though its trial number matches
]


def test_the_mlflow_runs_of_trials_whose_process_died_are_closed_and_no_others(tmp_path):
    from mlflow import MlflowClient

    from car_maker_pipeline.training.sweep_runs import close_runs_of_dead_trials

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    study = optuna.create_study(study_name="this", direction="maximize")
    runs = []
    for number, (name, state, status, _) in enumerate(DEAD_TRIAL_RUNS):
        if name == "this":
            trial = study.ask()
            if state != "RUNNING":
                study.tell(trial, 0.5 if state == "COMPLETE" else None, state=TrialState[state])
        tags = {"stage": "sweep_trial", "study_name": name, "trial_number": str(number if name == "this" else 1)}
        run = client.create_run(experiment, tags=tags)
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        runs.append(run.info.run_id)

    closed = close_runs_of_dead_trials(client, experiment, "this", study)

    assert sorted(closed) == sorted(run for run, row in zip(runs, DEAD_TRIAL_RUNS) if row[3])
    for run_id, (_, _, status, killed) in zip(runs, DEAD_TRIAL_RUNS):
        run = client.get_run(run_id)
        assert run.info.status == ("KILLED" if killed else status)
        assert (run.data.tags.get("trial_state") == "FAIL") is killed


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rate": {"low": 0.01, "high": 0.001}}, r"learning_rate: .*empty or inverted"),
        ({"learning_rate": {"low": 0.01, "high": 0.01}}, r"empty or inverted"),
        ({"lora_dropout": {"choices": []}}, r"lora_dropout: .*choices is empty"),
        ({"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, r"log range must lie above zero"),
        ({"learnig_rate": {"low": 0.001, "high": 0.01}}, r"'learnig_rate' is not a LoraHyperparameters field"),
        ({"lora_r": {"choices": [8, 0]}}, r"lora_r=0 is not a usable value"),
        ({"max_steps": {"choices": [20]}}, r"max_steps=20 is not a usable value.*checkpoint_every_n_steps"),
        ({"max_steps": {"choices": [40, 10]}, "checkpoint_every_n_steps": {"choices": [20]}}, r"max_steps=10 is not"),
        ({}, r"search space is empty"),
    ],
)
def test_a_bad_search_space_is_refused_naming_what_is_wrong(space, message):
    with pytest.raises(LoraTrainingError, match=message):
        parse_search_space(space, LoraHyperparameters())


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"n_trials": 0}, "n_trials"), ({"n_trials": -2}, "n_trials"), ({"objective": "val_loss"}, "unknown objective")],
)
def test_bad_sweep_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SweepSettings(**settings)


def test_from_sweep_without_a_finished_sweep_says_what_to_materialize(maker_dataset, tmp_path):
    from car_maker_pipeline.store import PipelineStore
    from car_maker_pipeline.training.sweep_runs import sweep_best

    with pytest.raises(LoraTrainingError, match="no finished sweep; materialize lora_sweep"):
        sweep_best(PipelineStore(tmp_path / "home"), "tiny-s", maker_dataset)


@pytest.mark.slow
def test_a_sweep_trains_real_trials_and_records_them_and_its_best_configuration(
    tiny_model_dir, maker_dataset, tmp_path
):
    import mlflow

    from car_maker_pipeline.store import LORA_SWEEP, PipelineStore
    from car_maker_pipeline.tracking import default_tracking_uri
    from car_maker_pipeline.training.sweep_runs import run_sweep, sweep_best

    store = PipelineStore(tmp_path / "home")
    uri = default_tracking_uri(store.root)
    base = LoraHyperparameters(per_device_train_batch_size=4, lora_r=4, bf16=False, warmup_steps=0)
    space = {  # the shape of the README's recipe; checkpoint_every_n_steps is searched with max_steps
        "learning_rate": {"low": 0.001, "high": 0.01, "log": True},
        "max_steps": {"choices": [4]},
        "checkpoint_every_n_steps": {"choices": [2]},
    }
    settings = SweepSettings(n_trials=3, search_space=space, heartbeat_interval_s=2, pruner_startup_trials=1)
    record = run_sweep(
        store, "tiny-s", str(tiny_model_dir), maker_dataset, base, settings, tracking_uri=uri, run_tags={}
    )
    summary = record.summary
    assert summary["trials_complete"] + summary["trials_pruned"] == 3 and summary["trials_failed"] == 0
    assert 0.001 <= summary["best_params"]["learning_rate"] <= 0.01
    assert list(record.trials["trial"]) == [0, 1, 2] and set(record.trials["state"]) <= {"COMPLETE", "PRUNED"}
    assert record.figures["optimization_history"].stat().st_size > 5000
    children = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_run(record.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record.parent_run_id}'",
    )
    assert sorted(run.data.tags["trial_number"] for run in children) == ["0", "1", "2"]
    assert all(run.data.tags["trial_state"] in {"COMPLETE", "PRUNED"} for run in children)
    assert all("checkpoint_val_accuracy" in run.data.metrics for run in children)
    best = sweep_best(store, "tiny-s", maker_dataset)
    assert best["best_params"]["max_steps"] == 4 and best["best_value"] == summary["best_value"]
    assert json.loads(store.manifest_path(LORA_SWEEP, "tiny-s").read_text())["study_name"] == record.study_name
    # A rerun with the same request finds the study finished and trains nothing more.
    again = run_sweep(
        store, "tiny-s", str(tiny_model_dir), maker_dataset, base, settings, tracking_uri=uri, run_tags={}
    )
    assert again.study_name == record.study_name and len(again.trials) == 3
    # What a process killed right after creating a trial leaves: the trial without a heartbeat, its MLflow
    # run RUNNING. The next sweep of the study fails the trial and closes the run.
    client = mlflow.MlflowClient(uri)
    orphan = optuna.load_study(study_name=record.study_name, storage=record.storage).ask()
    tags = {"stage": "sweep_trial", "study_name": record.study_name, "trial_number": str(orphan.number)}
    left = client.create_run(children[0].info.experiment_id, tags=tags).info.run_id
    run_sweep(store, "tiny-s", str(tiny_model_dir), maker_dataset, base, settings, tracking_uri=uri, run_tags={})
    assert client.get_run(left).info.status == "KILLED" and client.get_run(left).data.tags["trial_state"] == "FAIL"
