"""No credential from a URI, the environment or resource config reaches an error, a log, MLflow or the Dagster store.

`redact_uri`, case by case:

| URI                                                    | printed as                                   |
|--------------------------------------------------------|----------------------------------------------|
| http://ops:S3cret@127.0.0.1:5000                        | http://***@127.0.0.1:5000                     |
| http://:S3cret@mlflow.internal (password only)          | http://***@mlflow.internal                    |
| https://ghp_T0kenAsUser@mlflow.example.com/prefix       | https://***@mlflow.example.com/prefix         |
| http://ops:p%40ss%2Fw0rd@host (percent-encoded)         | http://***@host                               |
| https://host/x?token=T0k&page=2                         | https://host/x?token=***&page=2               |
| https://bucket/obj?X-Amz-Credential=A&X-Amz-Signature=S&X-Amz-Date=D | credential and signature ***, date kept |
| https://host/cb#access_token=T0k&state=1                | https://host/cb#access_token=***&state=1      |
| postgresql://mlflow:S3cret@db:5432/mlflow               | postgresql://***@db:5432/mlflow               |
| http://ops:S3cret@[::1]:5000/                           | http://***@[::1]:5000/                        |
| sqlite:////data/mlflow.db, http://127.0.0.1:5000, /local/folder | unchanged                            |

Through Dagster (an in-process run on a temporary on-disk instance), the secret is searched for in
the step's error, every event-log entry, every file of DAGSTER_HOME (run and event databases,
compute logs) and CAR_MAKER_HOME, and the process's stdout/stderr:

| where the secret is                                          | step that fails                      |
|--------------------------------------------------------------|--------------------------------------|
| MLFLOW_TRACKING_URI = http://ops:<password>@<closed port>     | baseline_evaluation (unreachable)    |
| ... password only (http://:<password>@...)                   | same                                 |
| ... https://                                                 | same                                 |
| ... percent-encoded password (both spellings searched)       | same                                 |
| ... ?token=<token> (refused: MLflow cannot use a query)      | same                                 |
| `mlflow_tracking.tracking_uri` = EnvVar holding user:password | same                                 |
| source `path_or_id` = EnvVar holding https://user:<token>@...?token=<token> | raw_stanford_cars     |

The same from the command line (`dagster asset materialize`, slow): its output and every file of
DAGSTER_HOME (compute logs included) and CAR_MAKER_HOME. `python -m car_maker_pipeline.classify`
with such a MLFLOW_TRACKING_URI exits 2 with a message naming
the server without the password. And against a live server demanding basic auth, credentials given as user info still authenticate
both the /health probe and MLflow's own requests, while the URI the pipeline passes on has none.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import pytest

from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation
from car_maker_pipeline.orchestration.assets.data import raw_stanford_cars
from car_maker_pipeline.orchestration.resources import (
    MlflowTracking,
    StanfordCarsSource,
    StoreResource,
    VisionLanguageModels,
)
from car_maker_pipeline.redaction import leaks_secret, redact_text, redact_uri
from car_maker_pipeline.tracking import ensure_reachable

PASSWORD = "S3cretPassw0rdNeverPrinted"
TOKEN = "hf_S3cretT0kenNeverPrinted"


@pytest.mark.parametrize(
    ("uri", "printed"),
    [
        ("http://ops:S3cret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("http://:S3cret@mlflow.internal", "http://***@mlflow.internal"),
        ("https://ghp_T0kenAsUser@mlflow.example.com/prefix", "https://***@mlflow.example.com/prefix"),
        ("http://ops:p%40ss%2Fw0rd@host", "http://***@host"),
        ("https://host/x?token=T0k&page=2", "https://host/x?token=***&page=2"),
        (
            "https://bucket/obj?X-Amz-Credential=A&X-Amz-Signature=S&X-Amz-Date=D",
            "https://bucket/obj?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=D",
        ),
        ("https://host/cb#access_token=T0k&state=1", "https://host/cb#access_token=***&state=1"),
        ("postgresql://mlflow:S3cret@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("http://ops:S3cret@[::1]:5000/", "http://***@[::1]:5000/"),
        ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("/local/folder", "/local/folder"),
    ],
)
def test_redact_uri(uri, printed):
    assert redact_uri(uri) == printed


def test_redact_text_catches_uris_and_credentials_from_the_environment():
    environ = {
        "HF_TOKEN": TOKEN,
        "MLFLOW_TRACKING_URI": f"http://ops:{PASSWORD}@mlflow:5000",
        "TOKENIZERS_PARALLELISM": "false",  # not a credential, though its name starts with TOKEN
        "PWD": "/srv/pipeline",
    }
    text = (
        f"could not reach 'http://ops:{PASSWORD}@mlflow:5000/api' nor https://h/x?api_key=abc; "
        f"the password {PASSWORD} and token {TOKEN} were quoted; parallelism false in /srv/pipeline"
    )
    redacted = redact_text(text, environ)
    assert PASSWORD not in redacted and TOKEN not in redacted and "abc" not in redacted
    assert "'http://***@mlflow:5000/api'" in redacted and "https://h/x?api_key=***;" in redacted
    assert "parallelism false in /srv/pipeline" in redacted


def _chained_error() -> RuntimeError:
    try:
        raise ValueError(f"bad URL http://ops:{PASSWORD}@host")
    except ValueError as cause:
        error = RuntimeError("loading failed")
        error.__cause__ = cause
        return error


def test_leaks_secret_looks_at_chained_causes():
    assert leaks_secret(_chained_error())
    assert not leaks_secret(RuntimeError("loading failed at http://host:5000"))


# ---------------------------------------------------------------------------------------------------
# Through Dagster: the error, the event log, every stored file and the process output
# ---------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_failing(assets, resources, tmp_path, partition=None):
    """(result, instance) of a run expected to fail, on an instance stored under tmp_path/dagster_home."""
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster_home"))
    result = dg.materialize(
        assets, resources=resources, instance=instance, partition_key=partition, raise_on_error=False
    )
    assert not result.success
    return result, instance


def step_error(result) -> str:
    return next(event for event in result.all_events if event.is_step_failure).step_failure_data.error.to_string()


def leaks(needles: list[str], result, instance, tmp_path: Path, output: str) -> list[str]:
    """Every place a needle was found: the step error, the event log, stored files, the process output."""
    from dagster._serdes import serialize_value

    texts = {
        "step error": step_error(result),
        "event log": "".join(serialize_value(entry) for entry in instance.all_logs(result.run_id)),
        "stdout/stderr": output,
    }
    found = [f"{where}: {needle}" for where, text in texts.items() for needle in needles if needle in text]
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):  # DAGSTER_HOME and CAR_MAKER_HOME
        data = path.read_bytes()
        found += [f"{path}: {needle}" for needle in needles if needle.encode() in data]
    return found


def _model_resources(home: Path, tracking: MlflowTracking) -> dict:
    return {
        "store": StoreResource(home=str(home)),
        "models": VisionLanguageModels(profile="demo"),
        "mlflow_tracking": tracking,
    }


@pytest.mark.parametrize(
    ("template", "needles"),
    [
        ("http://ops:{secret}@127.0.0.1:{port}", [PASSWORD]),
        ("http://:{secret}@127.0.0.1:{port}", [PASSWORD]),
        ("https://ops:{secret}@127.0.0.1:{port}", [PASSWORD]),
        ("http://ops:{secret}%2Fpa%40ss@127.0.0.1:{port}", [f"{PASSWORD}%2Fpa%40ss", f"{PASSWORD}/pa@ss"]),
        ("http://127.0.0.1:{port}/?token={secret}", [PASSWORD]),
    ],
    ids=["user-password", "password-only", "https", "percent-encoded", "query-token"],
)
def test_credentials_in_mlflow_tracking_uri_reach_no_log_or_store(tmp_path, monkeypatch, capfd, template, needles):
    port = closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", template.format(secret=PASSWORD, port=port))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    home = tmp_path / "home"

    result, instance = run_failing(
        [baseline_evaluation], _model_resources(home, MlflowTracking()), tmp_path, "tiny-s|maker"
    )

    error = step_error(result)
    assert "TrackingUnavailableError" in error and f"127.0.0.1:{port}" in error  # still says which server
    assert leaks(needles, result, instance, tmp_path, "".join(capfd.readouterr())) == []
    assert not (home / "demo_models").exists()  # failed before any model work


def test_a_tracking_uri_from_resource_config_via_envvar_is_not_stored(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OPS_MLFLOW_URI", f"http://ops:{PASSWORD}@127.0.0.1:{closed_port()}")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    home = tmp_path / "home"
    tracking = MlflowTracking(tracking_uri=dg.EnvVar("OPS_MLFLOW_URI"))

    result, instance = run_failing([baseline_evaluation], _model_resources(home, tracking), tmp_path, "tiny-s|maker")

    assert "127.0.0.1" in step_error(result)
    assert leaks([PASSWORD], result, instance, tmp_path, "".join(capfd.readouterr())) == []


def test_a_token_in_the_source_url_reaches_no_log_or_store(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OPS_SOURCE", f"https://reader:{TOKEN}@huggingface.co/datasets/org/cars?token={TOKEN}")
    home = tmp_path / "home"
    resources = {
        "store": StoreResource(home=str(home)),
        "source": StanfordCarsSource(profile="real", path_or_id=dg.EnvVar("OPS_SOURCE")),
    }

    result, instance = run_failing([raw_stanford_cars], resources, tmp_path)

    error = step_error(result)
    assert "SourceError" in error and "https://***@huggingface.co/datasets/org/cars?token=***" in error
    assert leaks([TOKEN], result, instance, tmp_path, "".join(capfd.readouterr())) == []


# ---------------------------------------------------------------------------------------------------
# A live server with basic auth: user info still authenticates, but is no longer in the URI
# ---------------------------------------------------------------------------------------------------


class _BasicAuthServer(BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(f"ops:{PASSWORD}/pa@ss".encode()).decode()
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.end_headers()
            return
        if self.path == "/health":
            body, status = b"OK", 200
        else:  # any MLflow API call: "no such experiment", which MLflow turns into None
            body = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}).encode()
            status = 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_user_info_still_authenticates_but_leaves_the_uri(monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = HTTPServer(("127.0.0.1", 0), _BasicAuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        uri = ensure_reachable(f"http://ops:{PASSWORD}%2Fpa%40ss@127.0.0.1:{port}")
        assert uri == f"http://127.0.0.1:{port}"
        assert mlflow.MlflowClient(uri).get_experiment_by_name("anything") is None
    finally:
        server.shutdown()
        server.server_close()
    paths = [path for path, _ in _BasicAuthServer.seen]
    assert paths[0] == "/health" and any(path.startswith("/api/2.0/mlflow/experiments/get-by-name") for path in paths)
    assert all(auth == _BasicAuthServer.expected for _, auth in _BasicAuthServer.seen)


def test_a_wrong_password_is_reported_without_it(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    server = HTTPServer(("127.0.0.1", 0), _BasicAuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from car_maker_pipeline.tracking import TrackingUnavailableError

        with pytest.raises(TrackingUnavailableError, match="401") as raised:
            ensure_reachable(f"http://ops:Wr0ngPassw0rd@127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert "Wr0ngPassw0rd" not in str(raised.value) and raised.value.__cause__ is None


def test_classify_reports_an_unreachable_server_without_its_password(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from car_maker_pipeline.classify import main

    image = tmp_path / "car.png"
    Image.new("RGB", (32, 24), "red").save(image)
    port = closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:{PASSWORD}@127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)

    assert main([str(image)]) == 2
    output = "".join(capsys.readouterr())
    assert f"http://127.0.0.1:{port} is unreachable" in output and PASSWORD not in output


@pytest.mark.slow
def test_the_dagster_command_line_prints_and_stores_no_tracking_password(tmp_path):
    """The issue's own case: `dagster asset materialize` with credentials in MLFLOW_TRACKING_URI, server down."""
    import subprocess

    from car_maker_pipeline_tests.support.cli import REPO, cli_env, materialize_command

    port = closed_port()
    env = cli_env(tmp_path, MLFLOW_TRACKING_URI=f"http://ops:{PASSWORD}@127.0.0.1:{port}")
    result = subprocess.run(
        materialize_command("baseline_evaluation", partition="tiny-s|maker"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr

    assert result.returncode != 0 and f"http://127.0.0.1:{port} is unreachable" in output
    assert PASSWORD not in output
    stored = [path for path in tmp_path.rglob("*") if path.is_file() and PASSWORD.encode() in path.read_bytes()]
    assert stored == [], "compute logs, event log or run storage hold the password"
    assert list(tmp_path.joinpath("dagster_home").rglob("*.db")), "the run was not recorded at all"
