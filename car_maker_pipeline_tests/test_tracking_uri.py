"""The default MLflow store under a CAR_MAKER_HOME whose path has URI characters in it.

For each home below, the default tracking URI is built, the store created through
`ensure_reachable`, and a real MLflow run logged (param, metric, artifact), registered as a model
version, and everything read back. The store must be `<home>/mlflow.db` and the artifacts under
`<home>/mlflow-artifacts`, with nothing written or created anywhere else (MLflow creates the parent
folder of the path as written in the URI: it left an empty `what%3Fnow` beside `what?now`, until the
encoded part of the URI took its slashes with it; see `sqlite_uri`):

| home folder name        | what a naive `sqlite:///{path}` did                   |
|-------------------------|--------------------------------------------------------|
| `with space`            | worked                                                 |
| `what?now`              | database created at `.../what` (SQLAlchemy's query starts at `?`) |
| `hash#tag`              | worked                                                 |
| `percent%41here`        | "unable to open database file" (SQLAlchemy decodes `%41` to `A`) |
| `50% off`               | worked (a `%` without two hex digits is not decoded)   |
| `slash%2Fname`          | wrong folder: SQLAlchemy decodes `%2F` to `/`          |
| `Citroën ÿ 日本`         | worked (non-ASCII)                                     |
| `a b?c#d%25e`           | all of them at once                                    |
"""

from __future__ import annotations

import mlflow
import pytest

from car_maker_pipeline.mlflow_store import default_tracking_uri, sqlite_database
from car_maker_pipeline.store import PipelineStore
from car_maker_pipeline.tracking import configured_tracking_uri, ensure_reachable, mlflow_run

HOME_NAMES = [
    "with space",
    "what?now",
    "hash#tag",
    "percent%41here",
    "50% off",
    "slash%2Fname",
    "Citroën ÿ 日本",
    "a b?c#d%25e",
]


@pytest.mark.parametrize("name", HOME_NAMES)
def test_mlflow_store_under_a_home_with_uri_characters(tmp_path, name):
    home = tmp_path / name
    home.mkdir()
    uri = default_tracking_uri(home)
    assert sqlite_database(uri) == home / "mlflow.db"

    assert ensure_reachable(uri) == uri
    assert (home / "mlflow.db").is_file()
    note = tmp_path / "note.txt"
    note.write_text(f"logged under {name}")
    with mlflow_run(uri, home, run_name="uri-characters", tags={"case": name}) as run:
        mlflow.log_param("home_name", name)
        mlflow.log_metric("accuracy", 0.5)
        mlflow.log_artifact(str(note), artifact_path="notes")
        artifact_uri = mlflow.get_artifact_uri("notes")

    client = mlflow.MlflowClient(uri)
    logged = client.get_run(run.info.run_id)
    assert logged.data.params["home_name"] == name and logged.data.metrics["accuracy"] == 0.5
    assert [item.path for item in client.list_artifacts(run.info.run_id, "notes")] == ["notes/note.txt"]
    client.create_registered_model("uri-characters")
    version = client.create_model_version("uri-characters", source=artifact_uri, run_id=run.info.run_id)
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/uri-characters/{version.version}", dst_path=str(tmp_path / "downloaded")
    )
    assert (tmp_path / "downloaded" / "note.txt").read_text() == f"logged under {name}", downloaded
    assert list((home / "mlflow-artifacts").rglob("note.txt")), "the artifact is not in the home's artifact store"

    outside = [
        path
        for path in tmp_path.rglob("*")
        if path.is_file() and home not in path.parents and path.parent != tmp_path and "downloaded" not in path.parts
    ]
    assert outside == [], f"MLflow wrote outside {home}"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([name, "note.txt", "downloaded"])


def test_the_configured_uri_follows_car_maker_home(tmp_path, monkeypatch):
    home = tmp_path / "runs 50%?#"
    monkeypatch.setenv("CAR_MAKER_HOME", str(home))
    uri = configured_tracking_uri(PipelineStore.from_env().root)
    assert sqlite_database(uri) == home / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert configured_tracking_uri(home) == "http://127.0.0.1:5000"


def test_system_metrics_go_to_the_named_store_whatever_the_global_tracking_uri(tmp_path, monkeypatch):
    """A training step reports to its run through the client API, in a process whose global tracking URI
    may be unset or another store (a resumed run never sets it): the machine's samples still land in the
    run, in the store named, and nowhere else."""
    import time

    from car_maker_pipeline.tracking import system_metrics

    uri, elsewhere = default_tracking_uri(tmp_path / "home"), default_tracking_uri(tmp_path / "elsewhere")
    for store in (uri, elsewhere):
        ensure_reachable(store)
    run_id = mlflow.MlflowClient(uri).create_run(experiment_id="0").info.run_id
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    # MLflow mirrors its global URI into MLFLOW_TRACKING_URI: monkeypatch puts the variable back afterwards,
    # and unsetting the global then leaves MLflow reading it as before.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(elsewhere)
    try:
        with system_metrics(run_id, uri):
            time.sleep(1.0)
    finally:
        mlflow.set_tracking_uri(None)
    sampled = {key for key in mlflow.MlflowClient(uri).get_run(run_id).data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= sampled
    assert mlflow.MlflowClient(elsewhere).search_runs(["0"]) == []


def _schema(path) -> tuple[dict, list]:
    """Every table and index with its definition's clauses as a set (MLflow's own migrations write a
    table's constraints in an order that differs from one run to the next), and the alembic revision."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as database:
        rows = database.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        revision = database.execute("SELECT version_num FROM alembic_version").fetchall()
    clauses = {
        (kind, name): {line.strip().rstrip(",") for line in (sql or "").splitlines()} for kind, name, sql in rows
    }
    return clauses, revision


def test_a_store_copied_from_the_cached_template_is_the_store_migrations_build(tmp_path, monkeypatch):
    """| store                        | schema and alembic revision | Default experiment's artifacts |
    |------------------------------|-----------------------------|--------------------------------|
    | migrated in place (no cache) | MLflow's                    | beside it                      |
    | copied from the template     | the same                    | beside it (not the template's) |
    """
    from car_maker_pipeline.mlflow_store import initialize_sqlite_store
    from car_maker_pipeline.settings import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    copied = tmp_path / "copied" / "mlflow.db"
    initialize_sqlite_store(default_tracking_uri(copied.parent))
    monkeypatch.delenv(CACHE_ENV)
    migrated = tmp_path / "migrated" / "mlflow.db"
    initialize_sqlite_store(default_tracking_uri(migrated.parent))
    assert _schema(copied) == _schema(migrated)
    for store in (copied, migrated):
        default = mlflow.MlflowClient(default_tracking_uri(store.parent)).get_experiment("0")
        assert default.artifact_location == (store.parent / "mlflow-artifacts").as_uri() + "/0"
