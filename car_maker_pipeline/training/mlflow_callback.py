"""Stream the Trainer's losses into our MLflow run, step by step, buffering while the server is down."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_RENAMED = {"loss": "train_loss", "eval_loss": "val_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}
PENDING_FILE = "mlflow_pending.jsonl"


class MlflowLossCallback(TrainerCallback):
    """Logs train loss, validation loss, learning rate and grad norm against the global step.

    HF's own MLflow integration stays off (`report_to="none"`): it would log every TrainingArguments
    field as a param, open a run of its own, and could not rejoin our run after a crash.

    A tracking server that stops answering does not stop training: the points go to `pending_path`
    (one JSON line each) and are sent at the next checkpoint, or by `flush()` when the asset (or its
    rerun) finishes, so the MLflow record ends complete either way.
    """

    def __init__(self, run_id: str, tracking_uri: str, pending_path: str | Path | None = None):
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.pending_path = Path(pending_path) if pending_path else None
        self.offline = False  # after one failure, stop paying timeouts until the next checkpoint

    def _send(self, points: list[tuple[str, float, int, int]]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in points]
        for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=metrics[start : start + 900])

    def _buffer(self, points) -> None:
        if self.pending_path is None:
            raise RuntimeError("MLflow is unreachable and no pending file was given")
        self.pending_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.pending_path, "a") as handle:
            for point in points:
                handle.write(json.dumps(point) + "\n")

    def pending_points(self) -> list[tuple[str, float, int, int]]:
        if self.pending_path is None or not self.pending_path.exists():
            return []
        points = []
        for line in self.pending_path.read_text().splitlines():
            try:
                points.append(tuple(json.loads(line)))
            except ValueError:  # the last line of a process killed mid-write: that one point is lost
                continue
        return points

    def flush(self) -> int:
        """Send every buffered point; raises when the server is still unreachable. Returns how many."""
        points = self.pending_points()
        if points:
            self._send(points)
            self.pending_path.unlink()
        self.offline = False
        return len(points)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = int(time.time() * 1000)
        points = [
            (_RENAMED[key], float(value), now, state.global_step)
            for key, value in logs.items()
            if key in _RENAMED and isinstance(value, (int, float))
        ]
        if not points:
            return
        if self.offline or self.pending_points():
            self._buffer(points)  # keep the order: older pending points go first
            return
        try:
            self._send(points)
        except Exception as error:  # noqa: BLE001 - any transport failure; training must go on
            if self.pending_path is None:
                raise
            self.offline = True
            logger.warning(
                "MLflow %s did not take the metrics at step %d (%s); buffering them in %s",
                self.tracking_uri,
                state.global_step,
                type(error).__name__,
                self.pending_path,
            )
            self._buffer(points)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and (self.offline or self.pending_points()):
            try:
                sent = self.flush()
                logger.info("MLflow %s is back: sent %d buffered metric points", self.tracking_uri, sent)
            except Exception:  # noqa: BLE001 - still down; try again at the next checkpoint
                self.offline = True
