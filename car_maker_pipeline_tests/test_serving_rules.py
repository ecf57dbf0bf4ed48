"""Serving rules that need no fine-tuned model: image bytes from outside, the champion rule, the
incoming folder (classified by the real tiny model), the sensor that watches it, and the lineage.

Image bytes (`decode_image`, used by the pyfunc model, `classify` and the batch predictions):

| bytes                                               | result                                                  |
|-----------------------------------------------------|---------------------------------------------------------|
| JPEG; PNG; grayscale PNG; RGBA PNG                  | decoded, size kept                                      |
| JPEG with EXIF orientation 6                        | decoded upright (48x64 from a 64x48 file)               |
| no bytes                                            | ImageInputError: "empty"                                |
| text; a PDF header; the first 20 bytes of a JPEG    | "not an image"                                          |
| the first half of a JPEG; of a PNG                  | "truncated or corrupt"                                  |
| PNG header of 9000x9000 (81 Mpx, Pillow is silent)  | "decompression bomb", the project's 64 Mpx limit named  |
| PNG header of 10000x10000 (Pillow only warns)       | same                                                    |
| PNG header of 100000x100000; JPEG header 65000x65000 (Pillow refuses) | same, in the same words              |

Champion rule (`decide_champion`):

| candidate val. accuracy | current champion                      | decision                          |
|-------------------------|---------------------------------------|-----------------------------------|
| 0.50                    | none                                  | promoted (first version)          |
| 0.60                    | v1 at 0.50, same maker list           | promoted                          |
| 0.50                    | v1 at 0.50, same maker list           | kept (equal is not better)        |
| 0.40                    | v1 at 0.50, same maker list           | kept                              |
| 0.90                    | v1 at 0.50, another maker list        | kept (accuracies do not compare)  |
| 0.90                    | v1 with no recorded accuracy          | kept                              |
"""

from __future__ import annotations

import os
import re
import time

import dagster as dg
import pandas as pd
import pytest

from car_maker_pipeline.recording.aliases import ChampionRecord, decide_champion
from car_maker_pipeline.serving.batch import PREDICTION_COLUMNS, classify_folder, snapshot
from car_maker_pipeline.serving.images import MAX_IMAGE_BYTES, ImageInputError, decode_image
from car_maker_pipeline_tests.support.hostile_images import (
    encoded,
    jpeg_declaring,
    png_declaring,
    rotated_jpeg,
    truncated,
)

MAKERS = ["AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce"]


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (encoded(), (64, 48)),
        (encoded(fmt="PNG"), (64, 48)),
        (encoded(fmt="PNG", mode="L"), (64, 48)),
        (encoded(fmt="PNG", mode="RGBA", color=(1, 2, 3, 0)), (64, 48)),
        (rotated_jpeg(), (48, 64)),
    ],
    ids=["jpeg", "png", "grayscale-png", "rgba-png", "exif-rotated-jpeg"],
)
def test_usable_images_decode_upright(data, size):
    assert decode_image(data).size == size


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not an image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not an image"),
        (encoded()[:20], "not an image"),
        (truncated(encoded((320, 240))), "truncated or corrupt"),
        (truncated(encoded((320, 240), fmt="PNG")), "truncated or corrupt"),
        (png_declaring(9000, 9000), "decompression bomb refused: the header declares 9000x9000 = 81,000,000 pixels"),
        (png_declaring(10_000, 10_000), "decompression bomb refused: the header declares 10000x10000"),
        (png_declaring(100_000, 100_000), "decompression bomb refused: the header declares 10,000,000,000 pixels"),
        (jpeg_declaring(65_000, 65_000), "decompression bomb refused: the header declares 4,225,000,000 pixels"),
        # Under the pixel limit, but padded to 8:1 for the model they would need terabytes: refused from the header.
        (png_declaring(8_000_000, 8), "8000000x8 is elongated (1,000,000:1)"),
        (png_declaring(8, 8_000_000), "8x8000000 is elongated (1,000,000:1)"),
        (png_declaring(60_000, 60), "60000x60 is elongated (1,000:1)"),
    ],
    ids=[
        "empty",
        "text",
        "pdf",
        "jpeg-header-only",
        "truncated-jpeg",
        "truncated-png",
        "81-mpx-header",
        "100-mpx-header",
        "10-gpx-png-header",
        "4-gpx-jpeg-header",
        "8000000x8-strip",
        "8x8000000-strip",
        "60000x60-strip",
    ],
)
def test_unusable_bytes_are_refused_with_the_problem_named(data, problem):
    with pytest.raises(ImageInputError, match=re.escape(problem)) as error:
        decode_image(data)
    if "bomb" in problem or "elongated" in problem:
        assert "64,000,000-pixel limit" in str(error.value)


CHAMPION_AT_HALF = ChampionRecord("1", 0.5, "same-makers")


@pytest.mark.parametrize(
    ("candidate", "champion", "promoted", "reason"),
    [
        (0.5, None, True, "first version becomes champion"),
        (0.6, CHAMPION_AT_HALF, True, "0.6000 beats champion v1's 0.5000"),
        (0.5, CHAMPION_AT_HALF, False, "0.5000 does not beat champion v1's 0.5000"),
        (0.4, CHAMPION_AT_HALF, False, "does not beat"),
        (0.9, ChampionRecord("1", 0.5, "other-makers"), False, "another maker list"),
        (0.9, ChampionRecord("1", None, "same-makers"), False, "another maker list"),
    ],
    ids=["first", "better", "equal", "worse", "other-makers", "no-accuracy"],
)
def test_champion_moves_only_to_a_better_version_on_the_same_makers(candidate, champion, promoted, reason):
    decision = decide_champion(candidate, "same-makers", champion)
    assert decision.promoted is promoted and reason in decision.reason
    assert decision.champion_before == champion and decision.candidate_val_accuracy == candidate


# --------------------------------------------------------------------------------------------
# The incoming folder, classified by the real (untuned) tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier
    from car_maker_pipeline.serving.predictor import MakerPredictor

    return MakerPredictor(MakerClassifier(tiny_model.model, tiny_model.processor, MAKERS, batch_size=4))


def incoming_folder(root):
    """Good images, every kind of bad file, a hidden file and a subfolder; returns the expected rows' reasons."""
    folder = root / "incoming"
    folder.mkdir()
    files = {
        "a-photo.jpg": (encoded((96, 64), color=(10, 200, 10)), None),
        "b-photo.png": (encoded((80, 60), fmt="PNG", color=(10, 10, 200)), None),
        "c-rotated.jpg": (rotated_jpeg(), None),
        "d-empty.jpg": (b"", "empty"),
        "e-notes.txt": (b"shopping list", "not an image"),
        "f-cut-off.jpg": (truncated(encoded((320, 240))), "truncated or corrupt"),
        "g-bomb.png": (png_declaring(100_000, 100_000), "decompression bomb"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    with open(folder / "h-huge.raw", "wb") as handle:  # sparse: no disk used, but over the byte limit
        handle.truncate(MAX_IMAGE_BYTES + 1)
    (folder / ".partial-upload.jpg").write_bytes(encoded())
    (folder / "subfolder").mkdir()
    reasons = {name: reason for name, (_, reason) in files.items()}
    reasons["h-huge.raw"] = "over the 52,428,800-byte limit"
    return folder, reasons


def test_every_file_gets_a_row_with_its_maker_or_the_reason(predictor, tmp_path):
    folder, reasons = incoming_folder(tmp_path)
    seen = snapshot(folder)
    assert list(seen.files) == sorted(reasons)  # hidden files and folders are not incoming images
    table = classify_folder(
        predictor.predict_bytes, folder, seen.files, model_name="car-maker-tiny-s", model_version="3", batch_size=2
    )
    assert list(table.columns) == PREDICTION_COLUMNS and list(table["file_name"]) == sorted(reasons)
    assert set(table["model_version"]) == {"3"} and set(table["model_name"]) == {"car-maker-tiny-s"}
    for row in table.itertuples():
        if reasons[row.file_name] is None:
            assert pd.isna(row.error) and row.maker in MAKERS and 0 < row.probability <= 1
        else:
            assert pd.isna(row.maker) and pd.isna(row.probability) and reasons[row.file_name] in row.error, row
    good = [name for name, reason in reasons.items() if reason is None]
    alone = predictor.predict_images([decode_image((folder / name).read_bytes()) for name in good])
    classified = table.set_index("file_name").loc[good]
    assert list(classified["maker"]) == list(alone["maker"])
    assert list(classified["probability"]) == pytest.approx(list(alone["probability"]), abs=1e-5)


def test_a_model_failure_stays_with_its_image_unless_every_image_fails(predictor, tmp_path):
    """Fault injection: a model that fails on one picture (as an out-of-memory error would)."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for index, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        (folder / f"photo-{index}.png").write_bytes(encoded(fmt="PNG", color=color))
    poisoned = (folder / "photo-1.png").read_bytes()

    def predict(blobs):
        if poisoned in blobs:
            raise RuntimeError("CUDA out of memory")
        return predictor.predict_bytes(blobs)

    files = snapshot(folder).files
    table = classify_folder(predict, folder, files, model_name="m", model_version="1", batch_size=3)
    assert list(table["error"].isna()) == [True, False, True]
    assert "the model failed on this image: CUDA out of memory" in table["error"][1]

    def broken(blobs):
        raise RuntimeError("the model is broken")

    with pytest.raises(RuntimeError, match="broken"):
        classify_folder(broken, folder, files, model_name="m", model_version="1")


# --------------------------------------------------------------------------------------------
# The sensor and the lineage
# --------------------------------------------------------------------------------------------


def _age(folder, seconds: float) -> None:
    for path in folder.iterdir():
        os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_sensor_launches_one_run_per_champion_model_per_new_file_set(tmp_path):
    from car_maker_pipeline.orchestration.assets.serving import IncomingImages
    from car_maker_pipeline.orchestration.incoming import incoming_images_sensor
    from car_maker_pipeline.orchestration.resources import StoreResource
    from car_maker_pipeline.store import CHECKPOINT_ACCURACY, MAKER_PREDICTIONS, PipelineStore

    assert incoming_images_sensor.default_status == dg.DefaultSensorStatus.STOPPED
    store = PipelineStore(tmp_path / "home")
    folder = tmp_path / "incoming"
    resources = {"store": StoreResource(home=str(store.root)), "incoming_images": IncomingImages(path=str(folder))}

    def tick(cursor=None):
        with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
            return incoming_images_sensor(context)

    assert "holds no files" in tick().skip_message  # the folder does not even exist yet
    folder.mkdir()
    (folder / "car.jpg").write_bytes(encoded())
    assert "waiting for copies to end" in tick().skip_message  # modified just now
    _age(folder, 120)
    assert "No model has a registered champion" in tick().skip_message

    store.write_manifest(CHECKPOINT_ACCURACY, {"registered_version": "1"}, partition="tiny-m")
    first = tick()
    fingerprint = snapshot(folder).fingerprint
    assert first.cursor == fingerprint
    assert [(r.partition_key, r.run_key) for r in first.run_requests] == [
        ("tiny-m|maker", f"{fingerprint}:tiny-m|maker")
    ]
    assert first.run_requests[0].asset_selection == [dg.AssetKey(MAKER_PREDICTIONS)]
    assert "No change" in tick(cursor=fingerprint).skip_message  # the same file set: never twice

    # A set maker_predictions already classified (here by hand for tiny-m) is not launched again for it.
    store.write_manifest(CHECKPOINT_ACCURACY, {"registered_version": "4"}, partition="tiny-s")
    store.write_manifest(MAKER_PREDICTIONS, {"fingerprint": fingerprint}, partition="tiny-m")
    assert [r.partition_key for r in tick().run_requests] == ["tiny-s|maker"]
    # A class-task champion (its results under tiny-s@class) gets its own run, partition tiny-s|class.
    store.write_manifest(CHECKPOINT_ACCURACY, {"registered_version": "1"}, partition="tiny-s@class")
    assert [r.partition_key for r in tick().run_requests] == ["tiny-s|maker", "tiny-s|class"]

    (folder / "another.png").write_bytes(encoded(fmt="PNG"))
    _age(folder, 120)
    again = tick(cursor=fingerprint)
    assert again.cursor != fingerprint and {r.partition_key for r in again.run_requests} == {
        "tiny-s|maker",
        "tiny-s|class",
        "tiny-m|maker",
    }


def test_lineage_and_jobs_put_the_serving_assets_after_checkpoint_accuracy():
    from car_maker_pipeline.definitions import defs
    from car_maker_pipeline.demo import PER_MODEL_JOBS

    graph = defs.resolve_asset_graph()
    for asset in ("merged_model", "maker_predictions"):
        assert graph.get(dg.AssetKey(asset)).parent_keys == {dg.AssetKey("checkpoint_accuracy")}
    serving = defs.resolve_job_def("serving_job")
    assert {key.to_user_string() for key in serving.asset_layer.executable_asset_keys} == {
        "merged_model",
        "maker_predictions",
    }
    assert PER_MODEL_JOBS[-1] == "serving_job"  # make demo materializes them after training


# --------------------------------------------------------------------------------------------
# Loading a registered classifier where its base model is missing or different
# --------------------------------------------------------------------------------------------


def test_a_missing_or_changed_base_model_is_named_before_any_adapter_loads(tiny_model_dir, tmp_path):
    from car_maker_pipeline.models.loading import ModelLoadError, local_revision
    from car_maker_pipeline.serving.predictor import ClassifierCard, MakerPredictor

    gone = ClassifierCard.for_base_model(str(tmp_path / "elsewhere"), "sha256-0", MAKERS)
    with pytest.raises(ModelLoadError, match=r"registered from the folder .*elsewhere, which does not exist"):
        MakerPredictor.load(gone, tmp_path)
    changed = ClassifierCard.for_base_model(str(tiny_model_dir), "sha256-trainedonanother", MAKERS)
    with pytest.raises(
        ModelLoadError, match=rf"has changed .*{local_revision(tiny_model_dir)}.*sha256-trainedonanother"
    ):
        MakerPredictor.load(changed, tmp_path)


@pytest.mark.parametrize("legacy", [True, False], ids=["earlier-card", "current-card"])
def test_adapter_cards_of_both_formats_name_the_base_model(tiny_model_dir, tmp_path, legacy):
    import json

    from car_maker_pipeline.serving.predictor import CARD_FILE, ClassifierCard

    if legacy:  # what checkpoint_accuracy wrote beside best_adapter/ before classifiers were pyfunc models
        card = {"makers": MAKERS, "base_model": str(tiny_model_dir), "base_model_revision": "sha256-x", "step": 8}
        (tmp_path / CARD_FILE).write_text(json.dumps(card))
    else:
        ClassifierCard.for_base_model(str(tiny_model_dir), "sha256-x", MAKERS, step=8).write(tmp_path)
    read = ClassifierCard.read(tmp_path)
    assert read.base_model == str(tiny_model_dir.resolve()) and read.base_model_id == tiny_model_dir.name
    assert (read.makers, read.base_model_revision, read.step) == (MAKERS, "sha256-x", 8)


def test_no_champion_is_an_error_that_says_what_to_materialize(tmp_path):
    from car_maker_pipeline.mlflow_store import initialize_sqlite_store
    from car_maker_pipeline.recording.registry import NoChampionError, champion_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    initialize_sqlite_store(uri)
    with pytest.raises(NoChampionError, match=r"car-maker-tiny-m has no @champion .* checkpoint_accuracy for tiny-m"):
        champion_version(uri, "tiny-m")
