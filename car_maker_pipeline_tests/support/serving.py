"""Serving test helpers: a store with a fine-tuned, registered tiny-s classifier, and a real scoring server.

    resources, instance = registered_classifier(home)
    with ScoringServer("models:/car-maker-tiny-s@champion", env) as server:
        status, body = server.invoke({"dataframe_split": ...})

`registered_classifier` materializes data (6 makers, 10 train and 4 test images each), a short LoRA
run on tiny-s and checkpoint_accuracy through the project's own assets and resources, so the
registered model is exactly what the pipeline registers; the incoming-images folder is
`<home>/incoming`. `ScoringServer` runs `mlflow models serve --env-manager local` on a free loopback
port in its own process group, and stops the whole group on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg

from car_maker_pipeline_tests.support.dagster_dev import free_loopback_port
from car_maker_pipeline_tests.support.pipeline import materialized_demo_data

MODEL = "tiny-s"
PARTITION = f"{MODEL}|maker"  # its maker task's Dagster partition
# Enough steps that the adapter's answers differ from the base model's, few enough for a test fixture.
SHORT_TRAINING = {"max_steps": 8, "checkpoint_every_n_steps": 4, "per_device_train_batch_size": 8}
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
TRAIN_PER_MAKER, TEST_PER_MAKER = 10, 4  # the demo source's size (per maker on average)


def registered_classifier(home: Path):
    from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation
    from car_maker_pipeline.orchestration.assets.evaluation import checkpoint_accuracy
    from car_maker_pipeline.orchestration.assets.serving import IncomingImages
    from car_maker_pipeline.orchestration.assets.training import lora_checkpoints

    resources, instance, _ = materialized_demo_data(
        home, train_per_maker=TRAIN_PER_MAKER, test_per_maker=TEST_PER_MAKER, corruptions=[]
    )
    resources = {**resources, "incoming_images": IncomingImages(path=str(home / "incoming"))}
    for asset, config in (
        (baseline_evaluation, {"max_images": 6}),
        (lora_checkpoints, SHORT_TRAINING),
        (checkpoint_accuracy, {"robustness": False}),
    ):
        result = dg.materialize(
            [asset],
            resources=resources,
            instance=instance,
            partition_key=PARTITION,
            run_config={"ops": {asset.key.to_user_string(): {"config": config}}},
        )
        assert result.success
    return resources, instance


def tracking_uri(home: Path) -> str:
    from car_maker_pipeline.mlflow_store import default_tracking_uri

    return default_tracking_uri(home)


def command_env(home: Path) -> dict[str, str]:
    """The environment a person would have after `. .venv/bin/activate`, pointed at the test's store."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # mlflow execs uvicorn by name
        "CAR_MAKER_HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking_uri(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


class ScoringServer:
    def __init__(self, model_uri: str, env: dict[str, str], log_path: Path, startup_timeout: float = 300.0):
        self.model_uri, self.env, self.log_path = model_uri, env, log_path
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        serve = [MLFLOW, "models", "serve", "-m", self.model_uri, "--env-manager", "local"]
        return [*serve, "-h", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> ScoringServer:
        log = open(self.log_path, "w")  # noqa: SIM115 (the server writes to it after this returns)
        self.process = subprocess.Popen(
            self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {self.process.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, OSError),
                urllib.request.urlopen(f"{self.url}/ping", timeout=5) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the scoring server did not answer /ping within {self.startup_timeout:.0f}s")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> ScoringServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def invoke(self, body: bytes | dict, content_type: str = "application/json", timeout: float = 120.0):
        """(HTTP status, parsed JSON or text) of POST /invocations; 4xx and 5xx are returned, not raised."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"{self.url}/invocations", data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


def saved_classifier(folder: Path, tiny_model_dir: Path, dataset_record, batch_size: int = 2) -> Path:
    """The pyfunc classifier saved by path, never registered, as `register_classifier` logs it: the tiny model
    with a fresh (untrained) LoRA adapter, for tests of what the model takes in, not of what it learnt."""
    import mlflow
    from peft import get_peft_model

    from car_maker_pipeline.models.loading import load_model_and_processor
    from car_maker_pipeline.recording.registry import Candidate, pyfunc_arguments
    from car_maker_pipeline.serving.predictor import ClassifierCard
    from car_maker_pipeline.training.config import LoraHyperparameters

    loaded = load_model_and_processor(str(tiny_model_dir))
    adapter = folder / "adapter"
    get_peft_model(loaded.model, LoraHyperparameters().to_peft_config()).save_pretrained(adapter)
    card = ClassifierCard.for_base_model(str(tiny_model_dir), loaded.revision, list(dataset_record.makers))
    arguments = pyfunc_arguments(Candidate(MODEL, adapter, card, 0.5, 0.5), folder / "staging", dataset_record)
    arguments["model_config"]["batch_size"] = batch_size  # small batches: one batch is a few images
    mlflow.pyfunc.save_model(str(folder / "model"), **arguments)
    return folder / "model"


def memory_measuring_env() -> dict[str, str]:
    """This environment with glibc's mmap threshold fixed at 1 MiB, for a process whose peak is measured.

    By default glibc raises the threshold to the size of each large block freed (up to 32 MiB), so
    decoded images start coming from the heap, where freed space is kept and fragments: the peak then
    drifts by a file or two from run to run whatever the code holds. A fixed threshold gives every
    large block back when it is freed, so the peak is what the code keeps alive.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1024**2)}


def peak_rss_kb(pid: int) -> int:
    """The largest VmHWM (peak resident memory) among `pid` and its descendants, from /proc."""
    peaks, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        peaks += [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")]
        pending += [int(child) for child in children]
    return max(peaks, default=0)
