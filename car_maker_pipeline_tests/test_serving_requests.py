"""What the pyfunc model takes in, in process: every form of an image, every bad row, the bounds, the
index, the type hints, and memory against the number of rows. The model is `register_classifier`'s
pyfunc saved by path (tiny-s with an untrained adapter: these tests are about the door, not the answers).

| `image` cell                                              | result                                              |
|-----------------------------------------------------------|-----------------------------------------------------|
| bytes; bytearray; memoryview; base64 str; {"b64": str}; base64 text as bytes; the text MLflow makes of {"b64": ...} | the answer raw bytes get |
| a path as a string                                        | MlflowException (INVALID_PARAMETER_VALUE): "row 1 ... looks like a file path ... send the file's bytes" |
| None; NaN (among bytes)                                   | "row 1 is empty (null)"                             |
| an int; a list                                            | "row 1 holds a value of type int / list"            |
| text that is not base64                                   | "row 1 is text, not an image, nor base64 ..."       |
| base64 of text that is not an image                       | "(base64 text, decoded to 23 bytes): not an image"  |
| b""; a truncated JPEG                                     | "empty (0 bytes)"; "truncated or corrupt"           |
| a NaN-only column                                         | MLflow's own schema error, an MlflowException too   |
| 129 rows; 3 images of 23 MB (over 64 MiB together)        | "Request too large", naming the bound, before any image is decoded |
| index [7, 3, 5] / ["b", "a"] / a filtered frame           | answers carry the caller's index; `frame.join(predict(frame))` pairs each image with its own answer |

Memory: peak RSS of a fresh process predicting 2, then 10 rows of 4000x4000 PNGs (48 MB each decoded,
batches of 2) grows by less than one decoded image (all rows decoded up front took 8 x 48 MB more, and the
previous batch kept beside the next one 2 x 48 MB).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from car_maker_pipeline_tests.support.hostile_images import encoded, large_png, padded_png, truncated
from car_maker_pipeline_tests.support.serving import memory_measuring_env, saved_classifier

REPO = Path(__file__).resolve().parents[1]
PHOTO = encoded((96, 64), color=(10, 200, 10))
B64 = base64.b64encode(PHOTO).decode()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_model_dir, maker_dataset):
    return saved_classifier(tmp_path_factory.mktemp("pyfunc"), tiny_model_dir, maker_dataset)


@pytest.fixture(scope="module")
def model(model_path):
    return mlflow.pyfunc.load_model(str(model_path))


def test_predict_has_type_hints_and_keeps_the_logged_signature(model_path, model):
    from car_maker_pipeline.serving.pyfunc_model import CarMakerClassifier

    hints = CarMakerClassifier().predict_type_hints  # MLflow's own reading of them
    assert hints.input is pd.DataFrame and hints.output is pd.DataFrame
    signature = mlflow.models.Model.load(str(model_path)).signature
    assert signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert not model.metadata._is_signature_from_type_hint()  # so every JSON request format still parses
    fresh = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-c",
            f"import runpy; runpy.run_path({str(model_path / 'pyfunc_model.py')!r})",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0 and "type hint" not in fresh.stderr.lower(), fresh.stderr[-2000:]


def test_every_form_of_an_image_gets_the_answer_its_bytes_get(model):
    forms = [
        bytearray(PHOTO),
        memoryview(PHOTO),
        B64,
        {"b64": B64},
        B64.encode(),  # what MLflow hands on from `instances` / `inputs`
        str({"b64": B64}).encode(),  # what MLflow makes of {"b64": ...} there
        base64.encodebytes(PHOTO).decode(),  # base64 with line breaks
    ]
    expected = model.predict(pd.DataFrame({"image": [PHOTO]})).iloc[0]
    answers = model.predict(pd.DataFrame({"image": forms}))
    assert list(answers["maker"]) == [expected["maker"]] * len(forms)
    assert list(answers["probability"]) == pytest.approx([expected["probability"]] * len(forms), abs=1e-4)


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ("/home/me/cars/car.jpg", "looks like a file path, and the model does not open files: send the file's bytes"),
        ("car.jpg", "looks like a file path"),
        (None, "row 1 is empty (null)"),
        (float("nan"), "row 1 is empty (null)"),
        (42, "row 1 holds a value of type int (42), not an image"),
        ([1, 2], "row 1 holds a value of type list"),
        ("this is not base64!", "row 1 is text, not an image, nor base64 or {'b64': base64} of one"),
        (base64.b64encode(b"just some words, no car").decode(), "(base64 text, decoded to 23 bytes): not an image"),
        (b"", "row 1: the image is empty (0 bytes)"),
        (truncated(encoded((320, 240))), "row 1: truncated or corrupt image data"),
    ],
    ids=["path", "bare-name", "none", "nan", "int", "list", "not-base64", "base64-of-text", "empty", "truncated"],
)
def test_a_bad_row_is_an_mlflow_error_naming_the_row_and_what_to_send(model, cell, problem):
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame({"image": [PHOTO, cell]}))
    assert error.value.error_code == "INVALID_PARAMETER_VALUE" and problem in error.value.message
    assert "row 1" in error.value.message


def test_a_column_of_nans_is_refused_by_mlflows_own_schema_check(model):
    with pytest.raises(MlflowException, match="image"):
        model.predict(pd.DataFrame({"image": [float("nan")]}))


def test_requests_over_the_bounds_are_refused_before_any_image_is_decoded(model, monkeypatch):
    from car_maker_pipeline.serving import predictor
    from car_maker_pipeline.serving.requests import MAX_REQUEST_BYTES, MAX_REQUEST_ROWS

    decoded = []
    monkeypatch.setattr(predictor, "decode_image", lambda data: decoded.append(data))  # records, never decodes
    with pytest.raises(MlflowException) as rows:
        model.predict(pd.DataFrame({"image": [PHOTO] * (MAX_REQUEST_ROWS + 1)}))
    assert f"{MAX_REQUEST_ROWS + 1:,} images, over the limit of {MAX_REQUEST_ROWS} per request" in rows.value.message
    third = MAX_REQUEST_BYTES // 3 + 1024**2
    with pytest.raises(MlflowException) as size:
        model.predict(pd.DataFrame({"image": [padded_png(third)] * 3}))
    assert f"more than {MAX_REQUEST_BYTES:,} bytes (the limit per request) by row 2" in size.value.message
    assert size.value.error_code == rows.value.error_code == "INVALID_PARAMETER_VALUE" and decoded == []


PHOTOS = [encoded((64, 48), color=color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]


@pytest.fixture(scope="module")
def alone(model):
    """Each photo's probability, classified on its own."""
    return [model.predict(pd.DataFrame({"image": [photo]})).iloc[0]["probability"] for photo in PHOTOS]


@pytest.mark.parametrize(
    "index",
    [[7, 3, 5], ["b", "a", "c"], pd.Index([2, 0, 1], name="upload")],
    ids=["shuffled", "labels", "named"],
)
def test_answers_carry_the_callers_index(model, alone, index):
    frame = pd.DataFrame({"image": PHOTOS, "id": ["red", "green", "blue"]}, index=index)
    answers = model.predict(frame)
    assert list(answers.index) == list(frame.index) and answers.index.name == frame.index.name
    joined = frame.iloc[::-1].join(answers)  # pairs by label, whatever the order
    assert list(joined["probability"]) == pytest.approx(alone[::-1], abs=1e-4)
    filtered = frame[frame["id"] != "red"]
    assert list(model.predict(filtered).index) == list(filtered.index)


ROWS_AND_PEAK = textwrap.dedent(
    """
    import sys, json
    import mlflow, pandas as pd
    def peak_mb():
        return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024
    model = mlflow.pyfunc.load_model(sys.argv[1])
    image = open(sys.argv[2], 'rb').read()
    peaks = {}
    for rows in (2, 2, 10):  # the first call also pays one-off allocations
        model.predict(pd.DataFrame({'image': [image] * rows}))
        peaks[rows] = peak_mb()
    print(json.dumps(peaks))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_peak_memory_is_one_batch_whatever_the_number_of_rows(model_path, tmp_path):
    image = tmp_path / "large.png"
    image.write_bytes(large_png(4000, 4000))  # 48 MB once decoded; batches of 2 (the saved model's batch_size)
    result = subprocess.run(
        [sys.executable, "-c", ROWS_AND_PEAK, str(model_path), str(image)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        env=memory_measuring_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = {int(rows): mb for rows, mb in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    print(f"peak RSS after 2 rows {peaks[2]:.0f} MB, after 10 rows {peaks[10]:.0f} MB")
    assert peaks[10] - peaks[2] < 48, peaks  # less than one more image; 8 more rows decoded up front were 384 MB
