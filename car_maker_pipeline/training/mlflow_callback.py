"""Stream the Trainer's losses into our MLflow run, step by step."""

from __future__ import annotations

import time

from transformers import TrainerCallback

_RENAMED = {"loss": "train_loss", "eval_loss": "val_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}


class MlflowLossCallback(TrainerCallback):
    """Logs train loss, validation loss, learning rate and grad norm against the global step.

    HF's own MLflow integration stays off (`report_to="none"`): it would log every TrainingArguments
    field as a param, open a run of its own, and could not rejoin our run after a crash.
    """

    def __init__(self, run_id: str, tracking_uri: str):
        self.run_id, self.tracking_uri = run_id, tracking_uri

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_RENAMED[key], float(value), now, state.global_step)
                   for key, value in logs.items() if key in _RENAMED and isinstance(value, (int, float))]
        if metrics:
            MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=metrics)
