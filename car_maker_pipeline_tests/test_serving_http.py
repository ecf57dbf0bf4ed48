"""`mlflow models serve` over the pyfunc model: every request format MLflow's scoring server documents,
the bounds, and the server's memory. Slow: one real server (its own process) for the module, on
`register_classifier`'s pyfunc saved by path (tiny-s, an untrained adapter).

| request (one demo photo unless said)                                  | answer                                      |
|-----------------------------------------------------------------------|---------------------------------------------|
| dataframe_split, dataframe_records (base64 text)                      | 200, the in-process answer                  |
| instances: [text], [{"image": text}], [{"image": {"b64": text}}]      | same                                        |
| inputs: {"image": [text]}, [text], [{"image": text}], {"image": [{"b64": text}]} | same                             |
| CSV of base64 text; Parquet of raw bytes                              | same                                        |
| instances: [{"b64": text}] (no column name)                           | 400 naming the missing `image` input        |
| dataframe_split with column "picture"                                 | 400 naming the missing `image` input        |
| text/plain body                                                       | 415 listing the accepted content types      |
| 129 rows                                                              | 400 "Request too large", the bound named    |
| a file path as text in dataframe_split                                | 400 naming row 0 and what to send           |

After every refusal the server answers the photo again. Memory: the server's peak RSS after 10 rows of
3000x3000 PNGs stays within 80 MB of its peak after 2 (batches of 2); the hostile requests of
`test_serving.BAD_REQUESTS` move it by less than 100 MB; both figures are printed.
"""

from __future__ import annotations

import base64
import io
import json

import mlflow
import pandas as pd
import pytest

from car_maker_pipeline_tests.support.hostile_images import encoded, large_png
from car_maker_pipeline_tests.support.serving import ScoringServer, command_env, peak_rss_kb, saved_classifier

pytestmark = pytest.mark.slow

PHOTO = encoded((96, 64), color=(10, 200, 10))
TEXT = base64.b64encode(PHOTO).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, maker_dataset):
    folder = tmp_path_factory.mktemp("served")
    path = saved_classifier(folder, tiny_model_dir, maker_dataset)
    expected = mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"image": [PHOTO]})).iloc[0]
    with ScoringServer(str(path), command_env(folder / "home"), folder / "serve.log") as server:
        yield server, expected


def _parquet() -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"image": [PHOTO]}).to_parquet(buffer)
    return buffer.getvalue()


FORMATS = {
    "dataframe_split": ({"dataframe_split": {"columns": ["image"], "data": [[TEXT]]}}, "application/json"),
    "dataframe_records": ({"dataframe_records": [{"image": TEXT}]}, "application/json"),
    "instances-values": ({"instances": [TEXT]}, "application/json"),
    "instances-records": ({"instances": [{"image": TEXT}]}, "application/json"),
    "instances-b64": ({"instances": [{"image": {"b64": TEXT}}]}, "application/json"),
    "inputs-columns": ({"inputs": {"image": [TEXT]}}, "application/json"),
    "inputs-values": ({"inputs": [TEXT]}, "application/json"),
    "inputs-records": ({"inputs": [{"image": TEXT}]}, "application/json"),
    "inputs-b64": ({"inputs": {"image": [{"b64": TEXT}]}}, "application/json"),
    "csv": (f"image\n{TEXT}\n".encode(), "text/csv"),
    "parquet": (_parquet(), "application/vnd.apache.parquet"),
}


def _answers_again(server, expected) -> None:
    status, body = server.invoke({"dataframe_split": {"columns": ["image"], "data": [[TEXT]]}})
    assert status == 200 and body["predictions"][0]["maker"] == expected["maker"], body


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_request_format_gets_the_in_process_answer(served, name):
    server, expected = served
    body, content_type = FORMATS[name]
    status, answer = server.invoke(body, content_type=content_type)
    assert status == 200, (name, answer)
    (prediction,) = answer["predictions"]
    assert prediction["maker"] == expected["maker"] and prediction["answer"] == expected["answer"]
    assert prediction["probability"] == pytest.approx(expected["probability"], abs=1e-4)


REFUSED = [
    ("b64-without-column", {"instances": [{"b64": TEXT}]}, "application/json", 400, "image"),
    ("wrong-column", {"dataframe_split": {"columns": ["picture"], "data": [[TEXT]]}}, "application/json", 400, "image"),
    ("plain-text", TEXT.encode(), "text/plain", 415, "application/json"),
    (
        "too-many-rows",
        {"inputs": {"image": [TEXT] * 129}},
        "application/json",
        400,
        "over the limit of 128 per request",
    ),
    (
        "a-path",
        {"inputs": {"image": ["/home/me/car.jpg"]}},
        "application/json",
        400,
        "row 0 is text, not an image, nor base64",
    ),
]


@pytest.mark.parametrize(("label", "body", "content_type", "status", "problem"), REFUSED, ids=[r[0] for r in REFUSED])
def test_other_requests_are_refused_with_what_to_send(served, label, body, content_type, status, problem):
    server, expected = served
    got, answer = server.invoke(body, content_type=content_type)
    text = answer["message"] if isinstance(answer, dict) else answer
    assert got == status and problem in text, (label, got, text[:500])
    _answers_again(server, expected)


def test_server_memory_is_one_batch_and_hostile_requests_do_not_move_it(served):
    from car_maker_pipeline_tests.test_serving import BAD_REQUESTS

    server, expected = served
    image = base64.b64encode(large_png(3000, 3000)).decode()
    peaks = {}
    for rows in (2, 2, 10):
        status, body = server.invoke({"inputs": {"image": [image] * rows}}, timeout=300)
        assert status == 200 and len(body["predictions"]) == rows, body
        peaks[rows] = peak_rss_kb(server.process.pid) / 1024
    for label, request, _ in BAD_REQUESTS:
        status, _ = server.invoke(request)
        assert 400 <= status < 500, label
    hostile = peak_rss_kb(server.process.pid) / 1024
    _answers_again(server, expected)
    print(json.dumps({"peak_mb_2_rows": peaks[2], "peak_mb_10_rows": peaks[10], "peak_mb_after_hostile": hostile}))
    assert peaks[10] - peaks[2] < 80, peaks
    assert hostile - peaks[10] < 100, (peaks, hostile)
