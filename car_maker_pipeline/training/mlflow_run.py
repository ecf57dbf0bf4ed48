"""The MLflow run of a training folder: created once, rejoined after a crash, completed at the end.

One training folder (same model, data and hyperparameters) is one MLflow run, however many times
the step is killed and rerun: `training_run_id` records the run id in the folder, and finds the run
by its tags when a kill fell between creating it and recording it. `complete_record` sends the loss
points a tracking outage left buffered and the run's summary metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow

from car_maker_pipeline.redaction import redact_uri
from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.tracking import TrackingUnavailableError, experiment_id, find_run, mlflow_run, scrub_secrets
from car_maker_pipeline.training.mlflow_callback import MlflowLossCallback
from car_maker_pipeline.training.result import LoraTrainingResult

RUN_ID_FILE = "mlflow_run.json"

logger = logging.getLogger(__name__)


def training_run_id(
    out_dir: Path, uri: str, home: Path, model_key: str, run_tags: dict[str, str], params: dict[str, Any]
) -> str:
    """The MLflow run of `out_dir`, created (with `params`, secrets scrubbed) on first use."""
    marker = out_dir / RUN_ID_FILE
    if marker.exists():
        return json.loads(marker.read_text())["run_id"]
    exp = experiment_id(uri, home)
    tags = {"model_key": model_key, "stage": "training", "training_dir": out_dir.name}
    # Killed between creating the run and writing the marker: find the run by its folder instead.
    existing = find_run(uri, exp, tags)
    if existing is not None:
        write_json_atomic(marker, {"run_id": existing})
        return existing
    client = mlflow.MlflowClient(uri)
    run = client.create_run(exp, run_name=f"lora-{model_key}", tags={**run_tags, **tags})
    for name, value in scrub_secrets(params).items():
        client.log_param(run.info.run_id, name, value)
    write_json_atomic(marker, {"run_id": run.info.run_id})
    return run.info.run_id


def complete_record(
    losses: MlflowLossCallback,
    result: LoraTrainingResult,
    *,
    uri: str,
    home: Path,
    model_key: str,
    run_id: str,
    run_tags: dict[str, str],
    log=logger,
) -> None:
    """Send what a tracking outage (in this run or a killed one) left buffered, then the summary metrics."""
    try:
        sent = losses.flush()
    except Exception as error:
        raise TrackingUnavailableError(
            f"MLflow at {redact_uri(uri)} stopped answering during training ({type(error).__name__}). Training finished and "
            f"its checkpoints are kept; {len(losses.pending_points())} loss points wait in {losses.pending_path}. "
            f"Bring the tracking server back and materialize lora_checkpoints for {model_key} again: it resumes "
            "at once and completes the MLflow record."
        ) from error
    if sent:
        log.warning(f"Sent {sent} loss points buffered while MLflow was unreachable.")
    with mlflow_run(uri, home, run_name=f"lora-{model_key}", tags=run_tags, run_id=run_id):
        mlflow.log_metrics({f"adapted_layers_{name}": count for name, count in result.adapted_layers.items()})
        mlflow.log_metric("global_step", result.global_step)
        for step, scores in sorted(result.validation_scores.items()):  # the constrained classifier's, per checkpoint
            mlflow.log_metrics({f"checkpoint_{name}": value for name, value in scores.items()}, step=step)
        mlflow.set_tags({"max_steps": result.max_steps, "last_request": result.plan or "trained"})
        if result.stop:  # why and where the run ended before max_steps
            mlflow.set_tags({"stopped_at_step": result.stop["step"], "stop_reason": result.stop["reason"]})
            mlflow.log_metric("steps_saved", result.max_steps - result.stop["step"])
