"""The review queue through a real Label Studio and back: import, annotate, export, ingest.

Label Studio is not a dependency of the project. Install it apart and point at its executable:

    python3.11 -m venv /tmp/ls && /tmp/ls/bin/pip install label-studio
    CAR_MAKER_LABEL_STUDIO=/tmp/ls/bin/label-studio pytest -m slow car_maker_pipeline_tests/test_label_studio.py

Without it the test is skipped; `test_review_queue.py` checks the same files against Label Studio's
documented import and export formats.

| step | through Label Studio's HTTP API (loopback port, a throwaway data folder)            | expected |
|------|-------------------------------------------------------------------------------------|----------|
| 1    | create a project with the queue's `label_config.xml`                                | accepted (the config is valid) |
| 2    | import `tasks.json`                                                                 | every task, each with the model's prediction |
| 3    | annotate: confirm one prediction, correct one, cancel (skip) one, leave one alone   | |
| 4    | export as JSON into the additions folder, ingest                                    | a batch: the confirmed and corrected labels accepted; the other two refused `no label` |
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request

import pandas as pd
import pytest

from car_maker_pipeline.data.added_rows import SourceIndex
from car_maker_pipeline.labeling.additions import ingest_additions
from car_maker_pipeline.labeling.batch_files import NO_LABEL
from car_maker_pipeline.labeling.review_queue import write_review_queue
from car_maker_pipeline.serving.batch import PREDICTION_COLUMNS
from car_maker_pipeline_tests.support.labeling import picture, prediction

LABEL_STUDIO = os.environ.get("CAR_MAKER_LABEL_STUDIO") or shutil.which("label-studio")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LABEL_STUDIO, reason="Label Studio is not installed (set CAR_MAKER_LABEL_STUDIO)"),
]


class LabelStudio:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture
def label_studio(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(20)
    data = tmp_path / "label-studio"
    command = [LABEL_STUDIO, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    command += ["--data-dir", str(data), "--username", "reviewer@example.com", "--password", secrets.token_hex(8)]
    command += ["--user-token", token, "--enable-legacy-api-token"]  # a fixed token for the API (1.23 defaults to JWT)
    # Nothing leaves the machine: no check for a newer release, no error reporting.
    environment = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LATEST_VERSION_CHECK": "false"}
    environment.update(SENTRY_DSN="", FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false")
    with open(tmp_path / "label-studio.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            yield _started(LabelStudio(f"http://127.0.0.1:{port}", token), process, tmp_path / "label-studio.log")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _started(server: LabelStudio, process: subprocess.Popen, log) -> LabelStudio:
    """The server once its health check answers (first start: its database is created, about a minute)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5):
                return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(2)


def test_review_queue_round_trip_through_label_studio(tmp_path, raw_dataset, label_studio):
    index = SourceIndex.of(raw_dataset.load())
    first, second, third = index.makers[:3]
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows = []
    for seed, (maker, runner_up) in enumerate([(first, second), (second, third), (third, first), (first, third)]):
        (incoming / f"{seed}.png").write_bytes(picture(300 + seed))
        rows.append(prediction(f"{seed}.png", maker, 0.5 - seed / 20, runner_up, 0.3, answer="unsure"))
    queue_dir = tmp_path / "queue"
    write_review_queue(
        pd.DataFrame(rows, columns=PREDICTION_COLUMNS),
        incoming,
        queue_dir,
        train_counts=dict.fromkeys(index.makers, 10),
        makers=index.makers,
        model="car-maker-tiny-s/1",
        predictions_path="predictions.parquet",
    )
    config = (queue_dir / "label_config.xml").read_text()
    project = label_studio.call("POST", "/api/projects", {"title": "car maker review", "label_config": config})
    tasks = json.loads((queue_dir / "tasks.json").read_text())
    imported = label_studio.call("POST", f"/api/projects/{project['id']}/import", tasks)
    assert (imported["task_count"], imported["prediction_count"]) == (4, 4)
    listed = label_studio.call("GET", f"/api/tasks?project={project['id']}&page_size=100")
    by_file = {task["data"]["file_name"]: task for task in (listed["tasks"] if isinstance(listed, dict) else listed)}
    assert set(by_file) == {"0.png", "1.png", "2.png", "3.png"}

    def annotate(file_name: str, choice: str | None, cancelled: bool = False) -> None:
        result = [{"from_name": "maker", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]
        body = {"result": result if choice else [], "was_cancelled": cancelled}
        label_studio.call("POST", f"/api/tasks/{by_file[file_name]['id']}/annotations", body)

    annotate("0.png", first)  # the model's answer, confirmed
    annotate("1.png", third)  # corrected: the model said `second`
    annotate("2.png", None, cancelled=True)  # skipped
    exported = label_studio.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
    (tmp_path / "additions").mkdir()
    (tmp_path / "additions" / "label-studio-export.json").write_text(json.dumps(exported))

    result = ingest_additions(tmp_path / "additions", tmp_path / "store", index)
    [batch] = result.batches
    assert batch.layout == "label studio"
    assert batch.accepted_per_maker == ({first: 1, third: 1} if first != third else {first: 2})
    assert sorted(row["reason"] for row in result.refused) == [NO_LABEL, NO_LABEL]
