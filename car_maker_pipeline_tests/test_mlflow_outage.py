"""The MLflow tracking server dies while `lora_checkpoints` trains: the step fails saying what to do, and
materializing it again sends what was buffered, so the one training run's record is complete.

| moment                                 | expected                                                          |
|----------------------------------------|-------------------------------------------------------------------|
| server killed at the first checkpoint  | training finishes (every checkpoint saved), the step fails naming |
|                                        | the outage and the command to run again; the losses it could not  |
|                                        | send wait in `mlflow_pending.jsonl`                                |
| server back, the step materialized     | "Sent ... buffered" reported, the buffer gone, one training run    |
|   again                                | with val_loss at every checkpoint and train_loss on both sides     |
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from car_maker_pipeline_tests.support.cli import IN_PROCESS, SMALL_SOURCE, cli_env, materialize, start_materialize

pytestmark = pytest.mark.slow


class MlflowServer:
    """`mlflow server` on a loopback port over a sqlite store that outlives the server process."""

    def __init__(self, root: Path):
        from car_maker_pipeline_tests.support.dagster_dev import free_loopback_port

        self.root, self.port = root, free_loopback_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (the server writes to it after this returns)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                (self.root / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As deploy/mlflow-server.sh starts it: without the job runner's eight processes, which the pipeline
            # never uses and which would start again with every restart.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError((self.root / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def test_mlflow_down_mid_training_fails_clearly_and_the_rerun_completes_the_record(tmp_path):
    from car_maker_pipeline.training.checkpoints import complete_checkpoints

    server = MlflowServer(tmp_path / "mlflow").start()
    # No retries: the dead server is noticed at once (the resource's own default is 2 retries).
    env = cli_env(tmp_path, MLFLOW_TRACKING_URI=server.uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    config = {  # the steps in the command's own process: the outage, not the executor, is under test
        "resources": SMALL_SOURCE,
        "ops": {
            "lora_checkpoints": {
                "config": {"max_steps": 24, "checkpoint_every_n_steps": 4, "per_device_train_batch_size": 4}
            }
        },
        **IN_PROCESS,
    }
    try:
        materialize(env, "raw_stanford_cars,car_maker_dataset", config={"resources": SMALL_SOURCE, **IN_PROCESS})
        process = start_materialize(env, "lora_checkpoints", "tiny-s|maker", config)
        home = Path(env["CAR_MAKER_HOME"])
        deadline = time.monotonic() + 600
        while (
            time.monotonic() < deadline
            and process.poll() is None
            and not any(complete_checkpoints(folder) for folder in home.glob("lora_checkpoints/tiny-s/*"))
        ):
            time.sleep(0.2)
        server.kill()  # the tracking server dies with training at its first checkpoint
        output, _ = process.communicate(timeout=900)
        assert process.returncode != 0, "the step succeeded although its MLflow record is incomplete"
        assert (
            "stopped answering during training" in output and "materialize lora_checkpoints for tiny-s again" in output
        )
        [training_dir] = list(home.glob("lora_checkpoints/tiny-s/*"))
        assert max(complete_checkpoints(training_dir)) == 24  # training itself finished: nothing to redo
        assert (training_dir / "mlflow_pending.jsonl").exists()

        server.start()
        rerun = materialize(env, "lora_checkpoints", "tiny-s|maker", config)
        assert (
            "Sent" in rerun.stdout + rerun.stderr
            and "buffered while MLflow was unreachable" in rerun.stdout + rerun.stderr
        )
        assert not (training_dir / "mlflow_pending.jsonl").exists()

        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("car_maker_pipeline")
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'training'")
        assert len(runs) == 1
        val_steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss"))
        train_steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")})
        assert val_steps == [4, 8, 12, 16, 20, 24]
        assert {1, 10, 20} <= set(train_steps)  # logged every 10 steps, before and after the outage
    finally:
        server.kill()
