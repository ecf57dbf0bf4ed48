"""Running the `dagster` command line as a user would, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
# Run config for a command that runs its steps in its own process, not one process per step (Dagster's default).
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
# The `source` resource's config for a small demo source (60 training pictures, 4 test pictures per maker on
# average): enough for every step to run, generated once per test session (the generation cache).
SMALL_SOURCE = {"source": {"config": {"demo_train_per_maker": 10, "demo_test_per_maker": 4, "demo_corruptions": []}}}


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """An environment with its own DAGSTER_HOME, CAR_MAKER_HOME and (through it) MLflow store."""
    (root / "dagster_home").mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri() in earlier in-process tests exports MLFLOW_TRACKING_URI; the CLI
    # runs here must use their own store under CAR_MAKER_HOME.
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {
        **inherited,
        "DAGSTER_HOME": str(root / "dagster_home"),
        "CAR_MAKER_HOME": str(root / "home"),
        "HF_HUB_OFFLINE": "1",
        "CAR_MAKER_PROFILE": "demo",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def cli_instance(env):
    """The Dagster instance that commands run with `env` record to; use it in a `with` block so it is closed."""
    import dagster as dg

    return dg.DagsterInstance.from_config(env["DAGSTER_HOME"])


def materialize_command(select: str, partition: str | None = None, config: dict | None = None) -> list[str]:
    command = [DAGSTER, "asset", "materialize", "-m", "car_maker_pipeline", "--select", select]
    if partition:
        command += ["--partition", partition]
    if config:
        command += ["--config-json", json.dumps(config)]
    return command


def start_materialize(env, select: str, partition: str | None = None, config: dict | None = None) -> subprocess.Popen:
    """The command started in a session of its own, so a test can SIGKILL it with the run and step processes
    it starts (`os.killpg`); its output, both streams, piped as text."""
    return subprocess.Popen(
        materialize_command(select, partition, config),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def materialize(env, select, partition=None, config=None, timeout=900, outputs: list[str] | None = None):
    result = subprocess.run(
        materialize_command(select, partition, config),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if outputs is not None:
        outputs.append(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "RUN_SUCCESS" in result.stdout + result.stderr
    return result
