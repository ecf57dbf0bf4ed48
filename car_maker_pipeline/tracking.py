"""MLflow helpers: reachability before any heavy work, one experiment, runs found again by tag."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from car_maker_pipeline.mlflow_store import default_tracking_uri, initialize_sqlite_store, sqlite_database
from car_maker_pipeline.redaction import redact_text, redact_uri

EXPERIMENT = "car_maker_pipeline"


class TrackingUnavailableError(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


def is_tracking_server(uri: str) -> bool:
    """Whether `uri` names an MLflow tracking server (HTTP), not a store this process opens itself."""
    return uri.startswith(("http://", "https://"))


def configured_tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the local sqlite store under the pipeline's home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(home)


def ensure_reachable(uri: str, timeout_s: float = 5.0) -> str:
    """Fail fast, before any model is loaded, when a remote tracking server does not answer
    (and create a local sqlite store safely before anything writes to it).

    Returns the URI every MLflow call should use: for a server, without its `user:password@`,
    which moves into MLflow's own basic-auth variables (see `move_credentials_to_environment`).
    Every message names the server with its credentials redacted.
    """
    initialize_sqlite_store(uri)
    if not is_tracking_server(uri):
        return uri
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise TrackingUnavailableError(
            f"The MLflow tracking URI {redact_uri(uri)} has a query string or fragment, which MLflow cannot use "
            "(it appends its API paths to the URI). Remove it; pass credentials as user:password@ in the URI, "
            "or in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."
        )
    uri = move_credentials_to_environment(uri)
    request = urllib.request.Request(f"{uri.rstrip('/')}/health", headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = response.status
    except (urllib.error.URLError, OSError, ValueError) as error:
        # `from None`: the cause is summarised (redacted) in the message; chained as it is, it could
        # carry the URI into the step's stored error.
        raise TrackingUnavailableError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({redact_text(str(error))}). Start it, fix "
            "the tracking_uri of the `mlflow_tracking` resource (or MLFLOW_TRACKING_URI), or leave it unset for "
            "the local sqlite store."
        ) from None
    if status != 200:
        raise TrackingUnavailableError(f"MLflow at {redact_uri(uri)} answered /health with HTTP {status}.")
    return uri


def move_credentials_to_environment(uri: str) -> str:
    """The server URI without `user:password@`, which goes to MLFLOW_TRACKING_USERNAME/PASSWORD instead.

    MLflow sends those variables as basic auth, exactly as it would the URI's user info, but it quotes
    the URI in its own error messages ("API request to http://user:password@host/... failed") and the
    pipeline passes it on to log lines and to the training subprocess; without the user info none of
    them can leak the password. Both values are percent-decoded, as an HTTP client would send them.
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow itself would send (its environment variables), for the /health probe."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def experiment_id(uri: str, home: Path, name: str = EXPERIMENT) -> str:
    import mlflow

    initialize_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifacts = None if is_tracking_server(uri) else (home / "mlflow-artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def tag_filter(tags: dict[str, str], *more: str) -> str:
    """An MLflow `search_runs` filter: every tag in `tags` equal, and the conditions in `more`."""
    return " and ".join([f"tags.{key} = '{value}'" for key, value in tags.items()] + list(more))


def find_run(uri: str, exp_id: str, tags: dict[str, str]) -> str | None:
    """The newest run whose tags all match, so a rerun continues a record instead of duplicating it."""
    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs(
        [exp_id], filter_string=tag_filter(tags), max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


WRITER_TAG = "writer"  # `<pid>@<host>` of the process logging an MLflow run, to recognise a killed one

# What `status_of(dagster_run_id)` answers about the Dagster run that wrote an MLflow run (see
# `delete_orphaned_runs`); the orchestration layer asks its instance.
COMMITTED = "committed"  # its step completed the partition being recorded again: its MLflow run is that record
RUNNING = "running"  # not finished, and its step has not completed the partition (yet)
FINISHED = "finished"  # finished without its step completing the partition
UNKNOWN = "unknown"  # not a run of this Dagster instance


def delete_orphaned_runs(uri: str, exp_id: str, tags: dict[str, str], status_of) -> list[str]:
    """Delete the runs matching `tags` that a step which never completed left behind (and any model
    version they registered); only those. Called before a step records them again.

    A step's MLflow run is its record only once the step has completed: materialized its asset
    partition and succeeded. A process killed after the run ended but before that (writing the
    manifest, storing the materialization, reporting success) leaves a finished run that the
    re-executed step would duplicate. So a run matching `tags` is deleted when its writer provably
    cannot go on and its step has not completed the partition:

    - still RUNNING: its writer (the `writer` tag, `<pid>@<host>`) is dead on this host, or its writer
      ran on another host and its Dagster run has finished here. A SIGKILLed command leaves its Dagster
      run STARTED, so that status alone cannot tell;
    - ended: its Dagster run is this instance's and either finished, or its writer is dead on this host.

    A Dagster run id this instance does not know (`UNKNOWN`) belongs to another Dagster instance sharing
    the store, whose live runs must never be touched; only a dead writer on this host condemns its run.
    A `COMMITTED` run is always kept.
    """
    from mlflow import MlflowClient

    from car_maker_pipeline.storage import writer_alive, writer_on_this_host

    client = MlflowClient(uri)
    deleted = []
    for run in client.search_runs([exp_id], filter_string=tag_filter(tags), max_results=1000):
        writer, status = run.data.tags.get(WRITER_TAG), status_of(run.data.tags.get("dagster_run_id"))
        if status == COMMITTED:
            continue
        if run.info.status == "RUNNING":
            cut_short = not writer_alive(writer) or (not writer_on_this_host(writer) and status == FINISHED)
        else:
            cut_short = status == FINISHED or (status == RUNNING and not writer_alive(writer))
        if not cut_short:
            continue
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            client.delete_model_version(version.name, version.version)
        client.delete_run(run.info.run_id)
        deleted.append(run.info.run_id)
    return deleted


@contextmanager
def mlflow_run(
    uri: str,
    home: Path,
    run_name: str,
    tags: dict[str, str],
    run_id: str | None = None,
    status_of=None,
    system_metrics: bool = False,
) -> Iterator:
    """An MLflow run in the pipeline's experiment. `status_of`: what the orchestrator knows of a Dagster
    run (see `delete_orphaned_runs`); given, runs with the same tags (but the Dagster run id) that a killed
    or failed step left behind are deleted first. `system_metrics`: CPU, memory (and GPU) sampled into the
    run while it is open."""
    import mlflow

    exp = experiment_id(uri, home)
    if status_of is not None:
        delete_orphaned_runs(uri, exp, {k: v for k, v in tags.items() if k != "dagster_run_id"}, status_of)
    from car_maker_pipeline.storage import writer_id

    mlflow.set_tracking_uri(uri)
    if system_metrics and "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp,
        run_name=None if run_id else run_name,
        tags={**tags, WRITER_TAG: writer_id()},
        log_system_metrics=system_metrics,
    ) as run:
        yield run


@contextmanager
def registry_lock(uri: str, home: Path, name: str) -> Iterator[None]:
    """Held while the versions and aliases of registered model `name` change, so that two processes
    (or two Dagster instances) sharing the tracking store take turns: a file lock beside a sqlite store,
    else in the pipeline home."""
    from car_maker_pipeline.locking import file_lock

    database = sqlite_database(uri)
    with file_lock((database.parent if database is not None else Path(home)) / f".registry-{name}.lock"):
        yield


def hf_token_env_names() -> tuple[str, ...]:
    return ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def scrub_secrets(values: dict) -> dict:
    """Drop anything that looks like a credential before it is logged as a param or tag."""
    secrets = {os.environ[name] for name in hf_token_env_names() if os.environ.get(name)}
    return {
        key: value
        for key, value in values.items()
        if not key.lower().endswith(("_token", "token", "password", "secret")) and str(value) not in secrets
    }


# Seconds between samples of MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and
# memory where NVIDIA's library is present). MLflow's default of 10 s misses most of a short run;
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still wins.
SYSTEM_METRICS_INTERVAL_S = 2.0


@contextmanager
def system_metrics(run_id: str, tracking_uri: str) -> Iterator[None]:
    """Record system metrics into run `run_id` of the store at `tracking_uri` while the block runs (training
    reports through the client API, outside an active run, so `start_run(log_system_metrics=True)` cannot do
    it there). The store is named: the monitor would otherwise look for the run in MLflow's global
    tracking URI, find nothing there and log nowhere."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=True, tracking_uri=tracking_uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def ui_base(uri: str, ui_url: str | None = None) -> str | None:
    """Where a person opens the MLflow UI for `uri`'s runs: `ui_url`, else the tracking server itself when
    it speaks HTTP; None for a local store nobody serves (a link would lead nowhere)."""
    base = ui_url or (uri if is_tracking_server(uri) else None)
    return redact_uri(base).rstrip("/") if base else None


def run_link(base: str, uri: str, run_id: str) -> str:
    import mlflow

    experiment = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


def model_version_link(base: str, name: str, version: str) -> str:
    return f"{base}/#/models/{name}/versions/{version}"
