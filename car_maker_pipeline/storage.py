"""Atomic writes and the small manifests through which assets find each other's outputs.

Assets write their data to versioned folders themselves (Arrow, parquet, safetensors) rather than
pickling it through Dagster's default IO manager; a manifest JSON written last, atomically, says
which folder is current. A crash therefore leaves either the old manifest or the new one, never a
half-written folder that a reader would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `final` (replacing it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class MissingUpstreamError(RuntimeError):
    """An asset's input has not been materialized yet."""


def read_manifest(path: Path, produced_by: str) -> dict:
    if not path.exists():
        raise MissingUpstreamError(
            f"{path} does not exist: materialize `{produced_by}` first "
            f"(for example `dagster asset materialize -m car_maker_pipeline --select {produced_by}`)."
        )
    return read_json(path)
