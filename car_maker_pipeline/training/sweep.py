"""A hyperparameter sweep over LoRA runs with Optuna: the study, its storage, and the loop that runs trials.

The study lives in an Optuna `RDBStorage`: sqlite under CAR_MAKER_HOME by default
(`lora_sweep/optuna.db`), or any SQLAlchemy URL (PostgreSQL in the scale-out profile,
`CAR_MAKER_OPTUNA_STORAGE`). Its name is a digest of what decides its trials (the base settings' maths,
the search space, the objective, the seed, the dataset), so a rerun of the same request continues the
same study until `n_trials` have finished (complete or pruned), and two processes on one study share it:

- a trial is created only under a file lock beside the study, after counting the finished and
  running ones, so two processes never create more trials than asked; Optuna numbers them, and
  each process tells only its own, so none is duplicated or lost;
- each running trial records a heartbeat; one whose process died is marked failed by
  `fail_stale_trials` once it misses `grace_period_s`, and does not count. A process waits for the
  trials others are running rather than overshooting `n_trials`. Optuna never fails a trial that has
  no heartbeat at all, so a trial's first heartbeat is recorded under the lock that created it, and a
  trial whose creator died before that is failed by the next process (`fail_trials_never_beaten`);
- the sampler (TPE by default) is seeded per trial number, from `seed`: the same study gives the same
  draws whichever process runs a trial, and two processes do not draw the same configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from car_maker_pipeline.locking import file_lock
from car_maker_pipeline.training.config import LoraHyperparameters
from car_maker_pipeline.training.search_space import STORAGE_ENV, SweepSettings, parse_search_space

logger = logging.getLogger(__name__)

STUDY_DB = "optuna.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Set on a trial, under the study lock, once its first heartbeat is recorded (see fail_trials_never_beaten).
FIRST_HEARTBEAT = "first_heartbeat_recorded"


def storage_url(settings: SweepSettings, sweep_root: Path) -> str:
    url = settings.storage_url or os.environ.get(STORAGE_ENV)
    if url:
        return url
    sweep_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{sweep_root / STUDY_DB}"


def open_storage(url: str, settings: SweepSettings, lock_path: Path | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage with heartbeats; created under `lock_path`, since two processes creating a new
    database's tables at once collide."""
    grace = settings.grace_period_s or 3 * settings.heartbeat_interval_s
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings(), file_lock(lock_path) if lock_path else nullcontext():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are marked experimental
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=settings.heartbeat_interval_s, grace_period=grace
        )


def study_name(model_key: str, dataset_name: str, base: LoraHyperparameters, settings: SweepSettings) -> str:
    """Same request, same study: what decides the trials, digested (not n_trials, which only says how many)."""
    request = {
        "maths": base.maths(),
        "max_steps": base.max_steps,
        "early_stopping": [base.early_stopping_patience, base.early_stopping_min_delta],
        "space": settings.search_space,
        "objective": settings.objective,
        "seed": settings.seed,
        "pruner": [settings.pruner, settings.pruner_startup_trials, settings.pruner_warmup_steps],
    }
    digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"lora-{model_key}-{dataset_name}-{digest}"


def make_pruner(settings: SweepSettings) -> optuna.pruners.BasePruner:
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(settings.pruner_startup_trials, settings.pruner_warmup_steps)
    if settings.pruner == "percentile":
        return optuna.pruners.PercentilePruner(25.0, settings.pruner_startup_trials, settings.pruner_warmup_steps)
    if settings.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def load_study(name: str, storage, settings: SweepSettings, trial_number: int = 0) -> optuna.Study:
    """The study, created on first use, with a sampler seeded for the trial about to be drawn."""
    sampler = optuna.samplers.TPESampler(seed=settings.seed * 100_003 + trial_number)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per reload of the study
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=make_pruner(settings),
        load_if_exists=True,
    )


def validate_request(base: LoraHyperparameters, settings: SweepSettings) -> None:
    """Every mistake in a sweep request, before any study or trial (LoraTrainingError)."""
    parse_search_space(settings.search_space, base)


@contextmanager
def heartbeat(storage, trial_id: int, interval: int):
    """Record the trial's heartbeat every `interval` seconds while the body runs (Optuna's optimize() does
    the same for the trials it runs; ask-and-tell trials need it done for them)."""
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # noqa: BLE001 - a missed beat only risks the trial being failed later
                logger.warning("Heartbeat of trial %s not recorded: %s", trial_id, error)
            stop.wait(interval)

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_trials_never_beaten(study: optuna.Study, storage) -> list[int]:
    """Fail the running trials whose process died between creating them and recording their first
    heartbeat; call it holding the study lock. Returns their numbers.

    Optuna's `fail_stale_trials` skips a trial without any heartbeat, so such a trial would stay
    RUNNING for ever, and every later process would wait for it to finish. `run_study` creates a trial,
    records its first heartbeat and marks it (`FIRST_HEARTBEAT`) before it lets go of the lock, so a
    running trial without the mark, seen under the lock, can only be one whose creator was killed.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not trial.system_attrs.get(FIRST_HEARTBEAT):
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001 - Optuna's own id
            failed.append(trial.number)
    if failed:
        logger.warning("Trials %s were left running by a process killed before their first heartbeat: failed", failed)
    return failed


def start_trial(name: str, storage, settings: SweepSettings, number: int) -> optuna.Trial:
    """A new trial, drawn by the sampler seeded for its number, with its first heartbeat recorded and
    marked; call it holding the study lock (see fail_trials_never_beaten)."""
    trial = load_study(name, storage, settings, trial_number=number).ask()
    storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - Optuna's own id
    storage.set_trial_system_attr(trial._trial_id, FIRST_HEARTBEAT, True)  # noqa: SLF001
    return trial


@dataclass(frozen=True)
class TrialOutcome:
    value: float | None  # None: pruned, or failed
    pruned: bool
    failed: str | None = None  # why the drawn configuration could not train (the trial fails, the sweep goes on)


def run_study(
    name: str,
    storage,
    settings: SweepSettings,
    lock_path: Path,
    run_trial: Callable[[optuna.Trial], TrialOutcome],
    log=logger,
) -> optuna.Study:
    """Run trials until `n_trials` have finished in the study, sharing it with any other process."""
    while True:
        with file_lock(lock_path):
            study = load_study(name, storage, settings)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead process's trial: failed, not counted
            fail_trials_never_beaten(study, storage)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= settings.n_trials:
                return study
            trial = None
            if finished + running < settings.n_trials:
                trial = start_trial(name, storage, settings, number=len(trials))
                study = trial.study  # seeded for this trial's number
        if trial is None:  # the remaining trials are running elsewhere: wait for them, or for them to go stale
            time.sleep(settings.heartbeat_interval_s)
            continue
        with heartbeat(storage, trial._trial_id, settings.heartbeat_interval_s):  # noqa: SLF001 - Optuna's own id
            try:
                outcome = run_trial(trial)
            except Exception:
                study.tell(trial, state=TrialState.FAIL)
                raise
        if outcome.failed:
            trial.set_user_attr("failed", outcome.failed)
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"trial {trial.number} failed: {outcome.failed}")
            continue
        if outcome.pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, outcome.value)
        log.info(f"trial {trial.number}: {'pruned' if outcome.pruned else outcome.value}")


def summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = lambda state: sum(t.state == state for t in trials)  # noqa: E731
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return {
        "best_params": dict(best.params) if best else {},
        "best_value": float(best.value) if best else float("nan"),
        "best_trial": best.number if best else None,
        "trials_complete": count(TrialState.COMPLETE),
        "trials_pruned": count(TrialState.PRUNED),
        "trials_failed": count(TrialState.FAIL),
    }
