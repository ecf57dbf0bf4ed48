"""Run a `lora_sweep` for one model: every trial a real LoRA run, recorded in MLflow and summarised.

Each trial trains through `train_lora`, the code `lora_checkpoints` runs, in a folder of its own
(`lora_sweep/<model>/<study>/trial-<n>`), and reports the constrained classifier's validation score
(the objective, best so far) to the study at every checkpoint, so the pruner can stop it there.
MLflow gets one parent run per study (`sweep-<model>`) and one child run per trial (its params, losses,
per-checkpoint scores, and whether it was pruned); a trial whose process was killed has its run closed
as KILLED by the process that finishes the study. At the end, Optuna's optimization history and
parameter importances (`optuna.visualization.matplotlib`) go to the parent run and the caller, and
the best configuration to the `lora_sweep` manifest, where `lora_checkpoints` (`from_sweep`) reads it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from optuna.trial import TrialState

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.data.tasks import MAKER, Task, dataset_answers
from car_maker_pipeline.store import LORA_SWEEP, MissingUpstreamError, PipelineStore
from car_maker_pipeline.tracking import experiment_id, find_run, scrub_secrets, tag_filter
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.mlflow_callback import MlflowLossCallback
from car_maker_pipeline.training.search_space import decoded_params, parse_search_space, suggest
from car_maker_pipeline.training.sweep import (
    SweepSettings,
    TrialOutcome,
    open_storage,
    run_study,
    storage_url,
    study_name,
    summary,
    validate_request,
)
from car_maker_pipeline.training.trainer import train_lora

logger = logging.getLogger(__name__)


@dataclass
class SweepRecord:
    study_name: str
    storage: str  # the URL, credentials redacted by the caller where shown
    summary: dict[str, Any]
    trials: pd.DataFrame
    figures: dict[str, Path] = field(default_factory=dict)
    parent_run_id: str = ""


class TrialReporter:
    """A `train_lora` listener: report the best objective so far at each checkpoint; stop when pruned."""

    def __init__(self, trial, objective: str, run_id: str, uri: str):
        self.trial, self.objective, self.run_id, self.uri = trial, objective, run_id, uri
        self.pruned = False

    def __call__(self, step: int, scores: dict[int, dict[str, float]]) -> str | None:
        best = max(values[self.objective] for values in scores.values())
        self.trial.report(best, step)
        mlflow.MlflowClient(self.uri).log_metric(
            self.run_id, f"checkpoint_{self.objective}", scores[step][self.objective], step=step
        )
        if self.trial.should_prune():
            self.pruned = True
            return f"pruned at step {step}: best {self.objective} {best:.4f} below the pruner's bar"
        return None


def _parent_run(uri: str, home: Path, model_key: str, name: str, settings: SweepSettings, tags: dict) -> str:
    exp = experiment_id(uri, home)
    match = {"stage": "sweep", "study_name": name}
    existing = find_run(uri, exp, match)
    if existing:
        return existing
    client = mlflow.MlflowClient(uri)
    run = client.create_run(exp, run_name=f"sweep-{model_key}", tags={**tags, **match, "model_key": model_key})
    client.log_param(run.info.run_id, "objective", settings.objective)
    client.log_param(run.info.run_id, "pruner", settings.pruner)
    client.log_param(run.info.run_id, "seed", settings.seed)
    client.log_text(run.info.run_id, str(settings.search_space), "search_space.txt")
    return run.info.run_id


def run_sweep(
    store: PipelineStore,
    model_key: str,
    base_model: str,
    dataset_record: MakerDataset,
    base: LoraHyperparameters,
    settings: SweepSettings,
    *,
    tracking_uri: str,
    run_tags: dict[str, str],
    log=logger,
    task: Task = MAKER,
) -> SweepRecord:
    validate_request(base, settings)  # every bad input before any study, data or model
    ranges = parse_search_space(settings.search_space, base)
    model_key = task.partition(model_key)  # the maker task's studies keep their names; the class task's add @class
    root = store.asset_dir(LORA_SWEEP, model_key)
    url = storage_url(settings, store.asset_dir(LORA_SWEEP))
    name = study_name(model_key, Path(dataset_record.path).name, base, settings)
    lock = root / f"{name}.lock"
    storage = open_storage(url, settings, lock)
    dataset = dataset_record.load()
    answers = dataset_answers(task, dataset_record.makers, dataset)
    parent = _parent_run(tracking_uri, store.root, model_key, name, settings, run_tags)
    client, experiment = mlflow.MlflowClient(tracking_uri), experiment_id(tracking_uri, store.root)

    def run_trial(trial) -> TrialOutcome:
        values = suggest(trial, ranges)
        try:
            hyper = LoraHyperparameters(**{**base.to_json(), **values})
        except ValueError as error:  # a combination of values that bound each other
            return TrialOutcome(None, False, failed=f"{values}: {error}")
        child = client.create_run(
            experiment,
            run_name=f"trial-{trial.number}",
            tags={
                **run_tags,
                "mlflow.parentRunId": parent,
                "stage": "sweep_trial",
                "study_name": name,
                "trial_number": str(trial.number),
                "model_key": model_key,
            },
        )
        run_id = child.info.run_id
        for key, value in scrub_secrets({**hyper.to_json(), "target_modules": ",".join(hyper.target_modules)}).items():
            client.log_param(run_id, key, value)
        reporter = TrialReporter(trial, settings.objective, run_id, tracking_uri)
        folder = root / name / f"trial-{trial.number}"
        try:
            result = train_lora(
                base_model,
                dataset["train"],
                dataset["validation"],
                answers,
                folder,
                hyper,
                callbacks=[MlflowLossCallback(run_id, tracking_uri, pending_path=folder / "mlflow_pending.jsonl")],
                prompt=task.prompt(answers),
                listeners=[reporter],
                task=task,
            )
        except Exception:
            client.set_tag(run_id, "trial_state", "FAIL")
            client.set_terminated(run_id, "FAILED")
            raise
        best = max(scores[settings.objective] for scores in result.validation_scores.values())
        client.log_metric(run_id, f"best_{settings.objective}", best)
        client.set_tag(run_id, "trial_state", "PRUNED" if reporter.pruned else "COMPLETE")
        if result.stop:
            client.set_tag(run_id, "stop_reason", result.stop["reason"])
        client.set_terminated(run_id, "FINISHED")
        return TrialOutcome(None if reporter.pruned else best, reporter.pruned)

    study = run_study(name, storage, settings, lock, run_trial, log)
    close_runs_of_dead_trials(client, experiment, name, study)
    record = SweepRecord(name, url, summary(study), trials_table(study), parent_run_id=parent)
    record.figures = sweep_figures(study, root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, value in record.summary.items():
            if (
                isinstance(value, (int, float))
                and value is not None
                and not (isinstance(value, float) and math.isnan(value))
            ):
                client.log_metric(parent, key, value)
        client.log_dict(parent, {"best_params": record.summary["best_params"]}, "best_params.json")
        for path in record.figures.values():
            client.log_artifact(parent, str(path), "figures")
    client.set_terminated(parent, "FINISHED")
    if record.summary["trials_complete"]:
        store.write_manifest(
            LORA_SWEEP,
            {
                "study_name": name,
                "best_params": decoded_params(record.summary["best_params"]),
                "best_value": record.summary["best_value"],
                "objective": settings.objective,
                "dataset_path": dataset_record.path,
                "mlflow_run_id": parent,
            },
            partition=model_key,
        )
    return record


def close_runs_of_dead_trials(client: mlflow.MlflowClient, experiment: str, name: str, study) -> list[str]:
    """Close as KILLED the MLflow runs of trials that Optuna failed because their process died.

    A killed sweep process leaves its trial's child run RUNNING; the process that fails the trial later
    (`fail_stale_trials`, `fail_trials_never_beaten`) only knows the Optuna trial. Called once the study
    is done, so every failed trial is final. A trial failed by its own process closed its run (FAILED)
    itself, and a trial still running elsewhere is not failed, so neither is touched. Returns the run ids.
    """
    failed = {str(trial.number) for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    condition = tag_filter({"stage": "sweep_trial", "study_name": name}, "attributes.status = 'RUNNING'")
    closed = []
    for run in client.search_runs([experiment], filter_string=condition, max_results=1000):
        if run.data.tags.get("trial_number") in failed:
            client.set_tag(run.info.run_id, "trial_state", "FAIL")
            client.set_tag(run.info.run_id, "stop_reason", "its process died; the study failed the trial")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def trials_table(study) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        steps = sorted(trial.intermediate_values)
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "value": float(trial.value) if trial.value is not None else float("nan"),
                "last_step": steps[-1] if steps else 0,
                "seconds": trial.duration.total_seconds() if trial.duration else float("nan"),
                **{f"param_{key}": str(value) for key, value in sorted(trial.params.items())},
            }
        )
    return pd.DataFrame(rows)


def sweep_figures(study, out: Path) -> dict[str, Path]:
    """Optuna's optimization history and parameter importances as PNGs (importances need two complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    plots = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "param_importances": optuna_plots.plot_param_importances,
    }
    for label, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
        except (ValueError, RuntimeError) as error:  # too few complete trials, or nothing varied
            logger.info("No %s figure: %s", label, error)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        figures[label] = out / f"{label}.png"
        figure.savefig(figures[label], dpi=100)
        plt.close(figure)
    return figures


def sweep_best(
    store: PipelineStore, model_key: str, dataset_record: MakerDataset, task: Task = MAKER
) -> dict[str, Any]:
    """The best configuration of the model's latest finished sweep for `task`, for `from_sweep` (LoraTrainingError
    if none)."""
    model_key = task.partition(model_key)
    try:
        manifest = store.read_manifest(LORA_SWEEP, model_key)
    except MissingUpstreamError as error:
        raise LoraTrainingError(
            f"from_sweep: {model_key} has no finished sweep; materialize lora_sweep for it first, or drop from_sweep."
        ) from error
    if not manifest or not manifest.get("best_params"):
        raise LoraTrainingError(
            f"from_sweep: {model_key}'s sweep has no complete trial; materialize lora_sweep again, or drop from_sweep."
        )
    if manifest.get("dataset_path") != dataset_record.path:
        log_note = f"(swept on {manifest.get('dataset_path')}, training on {dataset_record.path})"
        logger.warning("from_sweep: the sweep ran on another maker dataset %s", log_note)
    return manifest
