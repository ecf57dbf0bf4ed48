"""Work several pytest-xdist workers need, done once per test session."""

from __future__ import annotations

import json
import os

from car_maker_pipeline.locking import file_lock


def shared_across_workers(tmp_path_factory, name: str, build):
    """`build(folder)` run once per test session however many xdist workers ask, in a folder they share;
    the others wait for it, then read the same folder. Returns `(folder, build's JSON-able result)`."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # every worker's base folder sits in the session's
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with file_lock(root / f"shared-{name}.lock"):
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())
