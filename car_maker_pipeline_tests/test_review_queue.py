"""The review queue: ranked by its documented score, written in Label Studio's formats, and back as a batch.

| # | situation                                                       | documented behaviour                                            | test |
|---|-----------------------------------------------------------------|-----------------------------------------------------------------|------|
| 1 | unsure and sure answers, common and rare makers, a failed file  | unsure first; then (1 - margin) x sqrt(top count / maker count), highest first; failed rows left out | test_ranking_follows_the_documented_score |
| 2 | a queue of 3 from 5 images, one removed since it was classified | the 3 best readable ones; tasks.json per Label Studio's import format (inline image with the same pixels, the top maker as a prediction, names matching label_config.xml); queue.csv; contact sheet | test_queue_is_written_in_label_studio_and_csv_form |
| 3 | Label Studio export of the queue (one corrected, one skipped) dropped into additions/ | a batch: the reviewed labels accepted, the skipped task refused `no label` | test_reviewed_export_becomes_a_batch |
| 4 | the spreadsheet/ folder with its label column filled, copied into additions/ | a CSV batch; unlabeled rows refused `no label` | test_filled_spreadsheet_becomes_a_batch |
"""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ElementTree

import pandas as pd
import pytest
from PIL import Image

from car_maker_pipeline.data.added_rows import SourceIndex
from car_maker_pipeline.data.decoding import decode_checked
from car_maker_pipeline.labeling import label_studio
from car_maker_pipeline.labeling.additions import ingest_additions
from car_maker_pipeline.labeling.batch_files import NO_LABEL
from car_maker_pipeline.labeling.review_queue import QUEUE_COLUMNS, SPREADSHEET, rank, write_review_queue
from car_maker_pipeline.serving.batch import PREDICTION_COLUMNS
from car_maker_pipeline_tests.support.labeling import picture, prediction

COUNTS = {"BMW": 40, "AM General": 10, "Land Rover": 20}


def table() -> pd.DataFrame:
    return pd.DataFrame(
        [
            prediction("a.png", "BMW", 0.90, "Land Rover", 0.05),
            prediction("b.png", "BMW", 0.50, "AM General", 0.45),
            prediction("c.png", "AM General", 0.40, "BMW", 0.30, answer="unsure"),
            prediction("d.png", "BMW", 0.35, "Land Rover", 0.34, answer="unsure"),
            prediction("e.png", "Land Rover", 0.60, "BMW", 0.20),
            prediction("broken.png", None, float("nan"), None, float("nan"), error="not an image"),
        ],
        columns=PREDICTION_COLUMNS,
    )


@pytest.fixture
def incoming(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for seed, name in enumerate("abcde"):
        (folder / f"{name}.png").write_bytes(picture(100 + seed))
    return folder


@pytest.fixture(scope="module")
def index(raw_dataset):
    return SourceIndex.of(raw_dataset.load())


def queue(incoming, out, max_items=3):
    return write_review_queue(
        table(),
        incoming,
        out,
        train_counts=COUNTS,
        makers=sorted(COUNTS),
        model="car-maker-tiny-s/1",
        predictions_path="predictions.parquet",
        max_items=max_items,
    )


def test_ranking_follows_the_documented_score():
    ranked = rank(table(), COUNTS)
    assert list(ranked.columns) == QUEUE_COLUMNS
    rarity = {maker: math.sqrt(40 / count) for maker, count in COUNTS.items()}
    expected = {
        "c.png": (1 - 0.10) * rarity["AM General"],  # 1.8, unsure
        "d.png": (1 - 0.01) * rarity["BMW"],  # 0.99, unsure
        "b.png": (1 - 0.05) * rarity["BMW"],  # 0.95
        "e.png": (1 - 0.40) * rarity["Land Rover"],  # 0.85
        "a.png": (1 - 0.85) * rarity["BMW"],  # 0.15
    }
    assert list(ranked["file_name"]) == ["c.png", "d.png", "b.png", "e.png", "a.png"]
    assert ranked["score"].tolist() == pytest.approx([expected[name] for name in ranked["file_name"]])
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5]


def test_queue_is_written_in_label_studio_and_csv_form(tmp_path, incoming):
    (incoming / "d.png").unlink()  # removed since it was classified: skipped, the next one takes its place
    written = queue(incoming, tmp_path / "queue")
    assert (written.queued, written.unsure, written.candidates) == (3, 1, 5)
    folder = tmp_path / "queue"
    tasks = json.loads((folder / "tasks.json").read_text())
    assert [task["data"]["file_name"] for task in tasks] == ["c.png", "b.png", "e.png"]
    config = ElementTree.fromstring((folder / "label_config.xml").read_text())
    choices = config.find("Choices")
    assert [choice.get("value") for choice in choices] == sorted(COUNTS)
    for task in tasks:
        [region] = task["predictions"][0]["result"]
        assert (region["from_name"], region["to_name"]) == (choices.get("name"), choices.get("toName"))
        assert region["type"] == "choices" and region["value"]["choices"][0] in COUNTS
        inline = label_studio.inline_bytes(task["data"]["image"], 10**6)
        own = (incoming / task["data"]["file_name"]).read_bytes()
        assert decode_checked(inline)[1] == decode_checked(own)[1]
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["AM General"]
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(0.40)
    csv = pd.read_csv(folder / "queue.csv")
    assert list(csv.columns) == QUEUE_COLUMNS and csv["file_name"].tolist() == ["c.png", "b.png", "e.png"]
    with Image.open(folder / "contact_sheet.png") as sheet:
        assert sheet.width == 3 * 128 and sheet.height > 128


def test_reviewed_export_becomes_a_batch(tmp_path, incoming, index):
    queue(incoming, tmp_path / "queue", max_items=4)
    tasks = json.loads((tmp_path / "queue" / "tasks.json").read_text())
    reviewed = {"c.png": "BMW", "d.png": "Land Rover", "b.png": None, "e.png": "Land Rover"}  # b skipped
    for position, task in enumerate(tasks):  # what Label Studio's JSON export holds after the review
        task["id"] = position + 1
        label = reviewed[task["data"]["file_name"]]
        region = {**task["predictions"][0]["result"][0], "value": {"choices": [label]}}
        task["annotations"] = [{"id": position, "result": [region] if label else [], "was_cancelled": label is None}]
    (tmp_path / "additions").mkdir()
    (tmp_path / "additions" / "project-1-export.json").write_text(json.dumps(tasks))
    result = ingest_additions(tmp_path / "additions", tmp_path / "store", index)
    [batch] = result.batches
    assert batch.accepted_per_maker == {"BMW": 1, "Land Rover": 2}
    assert [row["reason"] for row in result.refused] == [NO_LABEL]


def test_filled_spreadsheet_becomes_a_batch(tmp_path, incoming, index):
    queue(incoming, tmp_path / "queue")
    target = tmp_path / "additions" / "reviewed-sheet"
    shutil.copytree(tmp_path / "queue" / SPREADSHEET, target)
    sheet = pd.read_csv(target / "labels.csv")
    sheet["label"] = ["am general", None, "Land Rover"]
    sheet.to_csv(target / "labels.csv", index=False)
    result = ingest_additions(tmp_path / "additions", tmp_path / "store", index)
    [batch] = result.batches
    assert (batch.layout, batch.accepted_per_maker) == ("csv", {"AM General": 1, "Land Rover": 1})
    assert [row["reason"] for row in result.refused] == [NO_LABEL]


def test_review_queue_asset_reads_the_partitions_predictions(tmp_path, incoming, maker_dataset):
    """The asset over a stored maker_predictions table: the queue, its counts and the contact sheet inline."""
    import dagster as dg

    from car_maker_pipeline.orchestration.assets.labeling import review_queue
    from car_maker_pipeline.orchestration.assets.serving import IncomingImages
    from car_maker_pipeline.orchestration.resources import StoreResource
    from car_maker_pipeline.store import CAR_MAKER_DATASET, MAKER_PREDICTIONS, PipelineStore

    store = PipelineStore(tmp_path / "home")
    parquet = tmp_path / "predictions.parquet"
    table().to_parquet(parquet)
    store.write_manifest(CAR_MAKER_DATASET, maker_dataset.to_json())
    manifest = {"path": str(parquet), "fingerprint": "files-0123", "model": "car-maker-tiny-s/1"}
    store.write_manifest(MAKER_PREDICTIONS, manifest, partition="tiny-s")
    result = dg.materialize(
        [review_queue],
        resources={"store": StoreResource(home=str(store.root)), "incoming_images": IncomingImages(path=str(incoming))},
        partition_key="tiny-s|maker",
        run_config={"ops": {"review_queue": {"config": {"max_items": 4}}}},
    )
    metadata = result.asset_materializations_for_node("review_queue")[0].metadata
    assert (metadata["queued"].value, metadata["unsure"].value, metadata["candidates"].value) == (4, 2, 5)
    assert metadata["contact_sheet"].value.startswith("![review queue](data:image/png;base64,")
    # ranked with the current dataset's training counts per maker
    expected = rank(table(), maker_dataset.images_per_maker["train"])["file_name"].tolist()[:4]
    assert [r.data["file_name"] for r in metadata["queue"].value.records] == expected
    assert store.read_manifest("review_queue", "tiny-s")["queued"] == 4
