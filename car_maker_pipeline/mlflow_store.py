"""The local MLflow store: a sqlite file under the pipeline's home, named by a URI that any path survives,
and created whole (from a migrated template when the build cache has one) or not at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
from pathlib import Path


def default_tracking_uri(home: Path) -> str:
    return sqlite_uri(home / "mlflow.db")


_DECODED_BY_SQLALCHEMY = re.compile(r"\?|%(?=[0-9A-Fa-f]{2})")


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URI of a sqlite file, for any path (spaces, `?`, `#`, `%`, non-ASCII).

    SQLAlchemy reads the path up to the first `?` (where the query starts) and percent-decodes it,
    so `?` and a `%` followed by two hex digits are percent-encoded; nothing else is. MLflow, before
    it connects, creates the parent folder of the path *as written in the URI* (not decoded), which
    left an empty `runs%3Fstage=1` folder beside a home named `runs?stage=1`. So from the first path
    component that needs encoding on, the slashes are encoded too (`%2F`, which SQLAlchemy decodes
    back): the written path's parent is then a real folder above it, and MLflow creates nothing new.
    """
    parts = Path(path).absolute().parts
    first = next((i for i, part in enumerate(parts) if _DECODED_BY_SQLALCHEMY.search(part)), None)
    if first is None:
        return "sqlite:///" + str(Path(path).absolute())
    plain = str(Path(*parts[:first]))
    encoded = "%2F".join(part.replace("%", "%25").replace("?", "%3F") for part in parts[first:])
    return "sqlite:///" + plain.rstrip("/") + "/" + encoded


def sqlite_database(uri: str) -> Path | None:
    """The file a `sqlite:///` URI names, read as SQLAlchemy reads it; None for other URIs and in-memory stores."""
    if not uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def initialize_sqlite_store(uri: str) -> None:
    """Create a local sqlite store whole or not at all.

    MLflow builds a new sqlite store by running its schema migrations in place; a process killed
    during them leaves a half-migrated file that every later run fails on. Here the migrations run
    on a temporary file, which is then linked into place only if no store exists yet. With a build
    cache (`CAR_MAKER_CACHE`) the migrations run once per MLflow version, into a template that each
    new store is copied from (about 7 s of migrations per new home otherwise).
    """
    path = sqlite_database(uri)
    if path is None or path.exists():
        return
    from car_maker_pipeline.storage import remove_stale_temporaries, temporary_prefix

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(temporary_prefix(path.name) + "init")
    tmp.unlink(missing_ok=True)
    artifacts = (path.parent / "mlflow-artifacts").as_uri()
    template = _migrated_template()
    if template is None:
        _migrate(tmp, artifacts)
    else:
        shutil.copyfile(template, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as database, database:
            # The one path a migrated store holds: where its Default experiment keeps artifacts.
            (location,) = database.execute(
                "SELECT artifact_location FROM experiments WHERE experiment_id = 0"
            ).fetchone()
            moved = artifacts + location[len(_template_artifacts(template)) :]
            database.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (moved,))
    try:
        os.link(tmp, path)  # atomic, and never over a store another process created meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _migrate(path: Path, artifacts: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(sqlite_uri(path), artifacts)
    store.engine.dispose()


def _template_artifacts(template: Path) -> str:
    return (template.parent / "mlflow-artifacts").as_uri()


def _migrated_template() -> Path | None:
    """An empty store migrated by this MLflow and SQLAlchemy, in the build cache (None without one)."""
    from importlib import metadata

    from car_maker_pipeline.locking import file_lock
    from car_maker_pipeline.settings import cache_root

    root = cache_root()
    if root is None:
        return None
    versions = f"mlflow-{metadata.version('mlflow')}-sqlalchemy-{metadata.version('sqlalchemy')}"
    template = root / "mlflow-store" / versions / "mlflow.db"
    template.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(template.parent / ".lock"):
        if not template.exists():
            building = template.with_name("building.db")
            building.unlink(missing_ok=True)
            _migrate(building, _template_artifacts(template))
            os.replace(building, template)
    return template
