"""The same pipeline on engines built for a team: a Dagster instance on PostgreSQL (deploy/dagster.yaml)
and an MLflow tracking server on PostgreSQL (deploy/mlflow-server.sh), both on loopback, read back
from PostgreSQL itself.

Needs Debian's `postgresql` server binaries (`.ci/run` installs them). Outside CI a machine without
them skips with the command to install; in CI (`CI` set) their absence fails.
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from car_maker_pipeline_tests.support.cli import REPO, SMALL_SOURCE, cli_env, materialize
from car_maker_pipeline_tests.support.dagster_dev import free_loopback_port
from car_maker_pipeline_tests.support.postgres import PASSWORD, ThrowawayPostgres, postgres_bin_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin_dir() is None:
        message = "PostgreSQL server binaries are not installed (apt-get install -y postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with ThrowawayPostgres() as pg:
        pg.create_database("dagster")
        pg.create_database("mlflow")
        yield pg


def command_lines(process_group: int) -> list[str]:
    """The command lines of a process group's processes, as `ps` shows them to any local user."""
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == process_group:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return lines


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """deploy/mlflow-server.sh, as a team would start it, with a PostgreSQL backend store."""
    port = free_loopback_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_PG_HOST": "127.0.0.1",
        "MLFLOW_PG_PORT": str(postgres.port),
        "MLFLOW_PG_USER": postgres.user,
        "MLFLOW_PG_PASSWORD": PASSWORD,
        "MLFLOW_PG_DB": "mlflow",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_ARTIFACTS": (tmp_path / "mlflow-artifacts").as_uri(),
    }
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 (the server writes to it after this returns)
    process = subprocess.Popen(
        ["bash", str(REPO / "deploy" / "mlflow-server.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((tmp_path / "mlflow-server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        lines = command_lines(process.pid)
        assert any("mlflow" in line for line in lines), lines
        assert not [line for line in lines if PASSWORD in line], "the database password is on a command line (ps)"
        assert not [line for line in lines if "mlflow.server.jobs" in line], "MLflow's job runner was started"
        yield uri
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
        process.wait()


def test_dagster_and_mlflow_on_postgres_record_the_runs(postgres, mlflow_server, tmp_path):
    env = cli_env(
        tmp_path,
        DAGSTER_PG_HOST="127.0.0.1",
        DAGSTER_PG_PORT=str(postgres.port),
        DAGSTER_PG_USERNAME=postgres.user,
        DAGSTER_PG_PASSWORD=PASSWORD,
        DAGSTER_PG_DB="dagster",
        MLFLOW_TRACKING_URI=mlflow_server,
    )
    shutil.copy(REPO / "deploy" / "dagster.yaml", Path(env["DAGSTER_HOME"]) / "dagster.yaml")

    materialize(env, "raw_stanford_cars,car_maker_dataset", config={"resources": SMALL_SOURCE})
    materialize(
        env,
        "baseline_evaluation",
        partition="tiny-s|maker",
        config={"resources": SMALL_SOURCE, "ops": {"baseline_evaluation": {"config": {"max_images": 12}}}},
    )

    # Dagster: the two runs and their materializations are rows in PostgreSQL, none in sqlite.
    assert not list(Path(env["DAGSTER_HOME"]).rglob("*.db"))
    runs = postgres.query("dagster", "select status from runs")
    assert sorted(status for (status,) in runs) == ["SUCCESS", "SUCCESS"]
    materialized = postgres.query(
        "dagster",
        "select asset_key, partition from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION' order by id",
    )
    assert [(key, partition) for key, partition in materialized] == [
        ('["raw_stanford_cars"]', None),
        ('["car_maker_dataset"]', None),
        ('["baseline_evaluation"]', "tiny-s|maker"),
    ]

    # MLflow: the baseline run, its parameters and metrics, in the server's PostgreSQL store.
    rows = postgres.query(
        "mlflow",
        "select r.run_uuid, m.value from runs r join metrics m on m.run_uuid = r.run_uuid "
        "join tags t on t.run_uuid = r.run_uuid "
        "where m.key = 'accuracy' and t.key = 'stage' and t.value = 'baseline'",
    )
    assert len(rows) == 1
    run_id, accuracy = rows[0]
    assert 0.0 <= accuracy <= 1.0
    params = dict(postgres.query("mlflow", f"select key, value from params where run_uuid = '{run_id}'"))
    assert params["num_images"] == "12" and params["model_key"] == "tiny-s"
    assert not (Path(env["CAR_MAKER_HOME"]) / "mlflow.db").exists()  # nothing fell back to the local store
