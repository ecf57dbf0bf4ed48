"""Labeled additions: each batch layout, each bad input, and what makes a batch (its content).

| #  | input                                                        | documented behaviour                                          | test |
|----|--------------------------------------------------------------|---------------------------------------------------------------|------|
| 1  | folder per label, labels `bmw`, ` Land  rover `, a class name in other case | accepted; makers as the dataset spells them, class kept | test_labels_differing_in_case_and_spaces_are_normalised |
| 2  | a label that is no maker or class; a maker absent from the data | refused: `unknown label`, naming the dataset's makers      | test_unknown_labels_are_refused |
| 3  | a maker where a class name is expected; a made-up model of a known maker | maker accepted (no class); made-up model refused, not prefix-matched | test_a_maker_where_a_class_name_is_expected |
| 4  | CSV without the `label` column                               | AdditionsError naming the batch and the header; nothing stored | test_csv_without_a_column_is_an_error_naming_the_batch |
| 5  | CSV rows `../../x.jpg`, `/etc/hostname`, `a/../../x`          | refused: `outside the batch`; the good row accepted           | test_csv_paths_leaving_the_batch_are_refused |
| 6  | link to a file out of the batch; label folder linked out      | refused: `outside the batch`, nothing outside read            | test_symlinks_out_of_the_batch_are_refused |
| 7  | Label Studio export: skipped, cancelled, no choice, two choices | refused: `no label` with the case; the annotated task accepted | test_label_studio_export_without_one_choice_is_refused_per_task |
| 8  | a test image re-encoded as PNG and as BMP; a train image      | refused: `duplicate of the dataset`, naming the source row     | test_a_test_image_by_pixels_is_refused |
| 9  | zero-byte file; oversized file (sparse, not read)             | refused: `undecodable` / `too large`                           | test_zero_byte_and_oversized_files_are_refused |
| 10 | the same image twice in a batch; again in a later batch       | first kept; then `duplicate`, `duplicate of the dataset`       | test_duplicates_in_and_across_batches_are_refused |
| 11 | a batch renamed after ingestion; then one file changed        | same batch id, not re-ingested; a changed file: a new batch, the old one stored | test_renamed_batch_is_the_same_and_a_changed_file_is_a_new_batch |
| 12 | `split.txt` = validation; = `holdout`                         | batch goes to validation; AdditionsError naming the batch     | test_split_marker |
| 13 | a batch with a CSV and a JSON; a CSV loose in additions/; a good batch | AdditionsError naming both; the good batch stored whole | test_a_batch_with_two_index_files_is_named_and_the_others_are_stored |
| 14 | no new batch (empty folder, or all ingested)                  | the source's pixel index is never built                       | test_the_source_index_is_built_only_for_a_new_batch |
"""

from __future__ import annotations

import io
import json
import os

import pytest

from car_maker_pipeline.data.added_rows import SourceIndex
from car_maker_pipeline.data.decoding import DUPLICATE, TOO_LARGE, UNDECODABLE
from car_maker_pipeline.labeling.additions import DUPLICATE_OF_DATASET, UNKNOWN_LABEL, AdditionsError, ingest_additions
from car_maker_pipeline.labeling.batch_files import NO_LABEL, OUTSIDE
from car_maker_pipeline.labeling.label_studio import data_uri
from car_maker_pipeline.serving.images import MAX_IMAGE_BYTES
from car_maker_pipeline_tests.support.labeling import picture


@pytest.fixture(scope="module")
def index(raw_dataset):
    return SourceIndex.of(raw_dataset.load())


def put(folder, relative: str, data: bytes) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def ingest(tmp_path, index):
    return ingest_additions(tmp_path / "additions", tmp_path / "store", index)


def by_path(result) -> dict:
    return {row["path"]: row for row in result.refused}


def test_labels_differing_in_case_and_spaces_are_normalised(tmp_path, index):
    bmw_class = next(name for name in index.class_names if name.startswith("BMW "))
    batch = tmp_path / "additions" / "mixed"
    put(batch, "bmw/a.png", picture(1))
    put(batch, " Land  rover /b.png", picture(2))
    put(batch, f"{bmw_class.upper()}/c.png", picture(3))
    result = ingest(tmp_path, index)
    [stored] = result.batches
    assert (stored.accepted, stored.refused_by_reason) == (3, {})
    assert stored.accepted_per_maker == {"BMW": 2, "Land Rover": 1}
    import datasets

    rows = datasets.Dataset.from_parquet(f"{stored.path}/rows.parquet")
    assert sorted(rows["source_class"]) == ["", "", bmw_class]


def test_unknown_labels_are_refused(tmp_path, index):
    batch = tmp_path / "additions" / "b"
    put(batch, "Pontiac/a.png", picture(1))  # no maker of Stanford Cars
    put(batch, "Audi/b.png", picture(2))  # a Stanford Cars maker the demo data does not hold
    put(batch, "BMW/c.png", picture(3))
    result = ingest(tmp_path, index)
    refused = by_path(result)
    assert {refused["Pontiac/a.png"]["reason"], refused["Audi/b.png"]["reason"]} == {UNKNOWN_LABEL}
    assert "not one of this dataset's makers" in refused["Audi/b.png"]["detail"]
    assert "BMW" in refused["Pontiac/a.png"]["detail"]  # the makers it could have been
    assert result.batches[0].accepted == 1


def test_a_maker_where_a_class_name_is_expected(tmp_path, index):
    batch = tmp_path / "additions" / "csv"
    bmw_class = next(name for name in index.class_names if name.startswith("BMW "))
    put(batch, "a.png", picture(1))
    put(batch, "b.png", picture(2))
    put(batch, "c.png", picture(3))
    put(batch, "labels.csv", f"path,label\na.png,{bmw_class}\nb.png,BMW\nc.png,BMW X9 Concept 2031\n".encode())
    result = ingest(tmp_path, index)
    assert result.batches[0].accepted_per_maker == {"BMW": 2}
    assert by_path(result)["c.png"]["reason"] == UNKNOWN_LABEL


def test_csv_without_a_column_is_an_error_naming_the_batch(tmp_path, index):
    put(tmp_path / "additions" / "good", "BMW/a.png", picture(1))
    batch = tmp_path / "additions" / "broken-csv"
    put(batch, "a.png", picture(2))
    put(batch, "labels.csv", b"path,maker\na.png,BMW\n")
    with pytest.raises(AdditionsError, match=r"broken-csv.*\['label'\].*path,label"):
        ingest(tmp_path, index)
    stored = sorted(path.name for path in (tmp_path / "store").iterdir())
    assert len(stored) == 1  # the good batch, whole; nothing of the broken one
    assert (tmp_path / "store" / stored[0] / "batch.json").exists()


def test_csv_paths_leaving_the_batch_are_refused(tmp_path, index):
    (tmp_path / "outside.png").write_bytes(picture(9))
    batch = tmp_path / "additions" / "csv"
    put(batch, "images/ok.png", picture(1))
    rows = ["../../outside.png", str(tmp_path / "outside.png"), "images/../../../outside.png", "images/ok.png"]
    put(batch, "labels.csv", ("path,label\n" + "".join(f"{row},BMW\n" for row in rows)).encode())
    result = ingest(tmp_path, index)
    refused = by_path(result)
    assert {refused[row]["reason"] for row in rows[:3]} == {OUTSIDE}
    assert "absolute" in refused[rows[1]]["detail"]
    assert result.batches[0].accepted == 1


def test_symlinks_out_of_the_batch_are_refused(tmp_path, index):
    elsewhere = tmp_path / "elsewhere"
    put(elsewhere, "car.png", picture(5))
    batch = tmp_path / "additions" / "links"
    put(batch, "BMW/own.png", picture(1))
    os.symlink(elsewhere / "car.png", batch / "BMW" / "linked.png")
    os.symlink(elsewhere, batch / "Land Rover")
    put(batch, "images/x.png", picture(6))
    result = ingest(tmp_path, index)
    refused = by_path(result)
    assert refused["BMW/linked.png"]["reason"] == OUTSIDE
    assert refused["Land Rover"]["reason"] == OUTSIDE
    assert result.batches[0].accepted_per_maker == {"BMW": 1}


def test_label_studio_export_without_one_choice_is_refused_per_task(tmp_path, index):
    def annotated(choices, cancelled=False):
        region = {"from_name": "maker", "to_name": "image", "type": "choices", "value": {"choices": choices}}
        return [{"result": [region] if choices is not None else [], "was_cancelled": cancelled}]

    tasks = [
        {"id": 1, "data": {"image": data_uri(picture(1))}, "annotations": annotated(["BMW"])},
        {"id": 2, "data": {"image": data_uri(picture(2))}, "annotations": []},  # skipped before annotating
        {"id": 3, "data": {"image": data_uri(picture(3))}, "annotations": annotated(["BMW"], cancelled=True)},
        {"id": 4, "data": {"image": data_uri(picture(4))}, "annotations": annotated(None)},
        {"id": 5, "data": {"image": data_uri(picture(5))}, "annotations": annotated(["BMW", "Land Rover"])},
    ]
    (tmp_path / "additions").mkdir()
    (tmp_path / "additions" / "reviewed.json").write_text(json.dumps(tasks))
    result = ingest(tmp_path, index)
    [stored] = result.batches
    assert (stored.layout, stored.accepted, stored.refused_by_reason) == ("label studio", 1, {NO_LABEL: 4})
    details = sorted(row["detail"] for row in result.refused)
    assert [d.split(" ")[0] for d in details] == ["2", "no", "skipped:", "skipped:"]


def test_a_test_image_by_pixels_is_refused(tmp_path, index, maker_dataset):
    dataset = maker_dataset.load()
    batch = tmp_path / "additions" / "leak"
    for fmt, row in (("PNG", 0), ("BMP", 1)):
        buffer = io.BytesIO()
        dataset["test"][row]["image"].save(buffer, format=fmt)
        put(batch, f"{dataset['test'][row]['maker']}/test{row}.{fmt.lower()}", buffer.getvalue())
    buffer = io.BytesIO()
    dataset["train"][0]["image"].save(buffer, format="PNG")
    put(batch, f"{dataset['train'][0]['maker']}/train0.png", buffer.getvalue())
    result = ingest(tmp_path, index)
    assert result.batches[0].accepted == 0
    assert [row["reason"] for row in result.refused] == [DUPLICATE_OF_DATASET] * 3
    assert sum("the source's test row" in row["detail"] for row in result.refused) == 2


def test_zero_byte_and_oversized_files_are_refused(tmp_path, index):
    batch = tmp_path / "additions" / "b"
    put(batch, "BMW/empty.jpg", b"")
    put(batch, "BMW/ok.png", picture(1))
    with open(batch / "BMW" / "huge.png", "wb") as handle:
        handle.truncate(MAX_IMAGE_BYTES + 1)  # sparse: refused from its size, never read
    refused = by_path(ingest(tmp_path, index))
    assert refused["BMW/empty.jpg"]["reason"] == UNDECODABLE
    assert refused["BMW/huge.png"]["reason"] == TOO_LARGE


def test_duplicates_in_and_across_batches_are_refused(tmp_path, index):
    put(tmp_path / "additions" / "first", "BMW/a.png", picture(1))
    put(tmp_path / "additions" / "first", "BMW/again.png", picture(1))
    first = ingest(tmp_path, index)
    assert by_path(first)["BMW/again.png"]["reason"] == DUPLICATE
    put(tmp_path / "additions" / "second", "Land Rover/same.png", picture(1, fmt="BMP"))
    second = ingest(tmp_path, index)
    assert by_path(second)["Land Rover/same.png"]["reason"] == DUPLICATE_OF_DATASET
    assert first.batches[0].batch_id in by_path(second)["Land Rover/same.png"]["detail"]


def test_renamed_batch_is_the_same_and_a_changed_file_is_a_new_batch(tmp_path, index):
    additions = tmp_path / "additions"
    put(additions / "monday", "BMW/a.png", picture(1))
    put(additions / "monday", "BMW/b.png", picture(2))
    [before] = ingest(tmp_path, index).batches
    (additions / "monday").rename(additions / "renamed")
    again = ingest(tmp_path, index)
    [after] = again.batches
    assert again.new == [] and after.batch_id == before.batch_id and after.ingested_at == before.ingested_at
    assert (after.name, after.ingested_as) == ("renamed", "monday")
    put(additions / "renamed", "BMW/b.png", picture(3))
    changed = ingest(tmp_path, index)
    [new] = changed.batches
    assert changed.new == [new.batch_id] and new.batch_id != before.batch_id and new.accepted == 2
    assert (tmp_path / "store" / before.batch_id / "batch.json").exists()  # the old version stays stored


def test_split_marker(tmp_path, index):
    put(tmp_path / "additions" / "calibration", "BMW/a.png", picture(1))
    put(tmp_path / "additions" / "calibration", "split.txt", b"validation\n")
    assert ingest(tmp_path, index).batches[0].split == "validation"
    put(tmp_path / "additions" / "odd", "BMW/b.png", picture(2))
    put(tmp_path / "additions" / "odd", "split.txt", b"holdout")
    with pytest.raises(AdditionsError, match=r"'odd'.*split.txt.*'holdout'"):
        ingest(tmp_path, index)


def test_a_batch_with_two_index_files_is_named_and_the_others_are_stored(tmp_path, index):
    put(tmp_path / "additions" / "a-good", "BMW/a.png", picture(1))
    put(tmp_path / "additions" / "b-two-indexes", "labels.csv", b"path,label\n")
    put(tmp_path / "additions" / "b-two-indexes", "export.json", b"[]")
    put(tmp_path / "additions", "c-loose.csv", b"path,label\nx.png,BMW\n")
    with pytest.raises(AdditionsError, match=r"2 batch.*'b-two-indexes' holds 2 index files.*'c-loose.csv' is a CSV"):
        ingest(tmp_path, index)
    [stored] = list((tmp_path / "store").iterdir())
    assert json.loads((stored / "batch.json").read_text())["name"] == "a-good"


def test_the_source_index_is_built_only_for_a_new_batch(tmp_path, index):
    """An empty or already ingested folder never decodes the source (the index is asked for lazily)."""

    def unused():
        raise AssertionError("the source index was built with no new batch to check")

    assert ingest_additions(tmp_path / "additions", tmp_path / "store", unused).batches == []
    put(tmp_path / "additions" / "b", "BMW/a.png", picture(1))
    ingest(tmp_path, index)
    assert len(ingest_additions(tmp_path / "additions", tmp_path / "store", unused).batches) == 1
