"""The maker dataset learns from labeled additions; test never changes.

| # | situation                                            | documented behaviour                                                | test |
|---|------------------------------------------------------|---------------------------------------------------------------------|------|
| 1 | a train batch and a validation batch                 | rows appended to those splits with `provenance` = batch id; source rows `source`; test and corrupted copies identical | test_batches_join_train_and_validation_and_test_is_untouched |
| 2 | rows per maker                                       | the record holds train/validation per maker before and after        | (same) |
| 3 | an addition whose pixels are already in the dataset  | dropped at build time too, listed with its batch and file           | test_an_addition_already_in_the_dataset_is_dropped_at_build |
| 4 | a folder dropped into CAR_MAKER_HOME/additions, then Dagster | labeled_additions lists it; car_maker_dataset's metadata shows before/after; its data version changes (training turns stale); an unchanged rerun keeps it | test_dropped_folder_reaches_the_dataset_through_dagster |
| 4b | then lora_checkpoints (2 steps, slow)                 | the training run's MLflow inputs name the batch; its metadata lists it | test_the_next_training_run_lists_the_batch_among_its_inputs |
| 5 | a finished training run on a dataset with a batch            | its MLflow inputs: train, validation and `labeled_additions/<batch>` (context: its split); the version description names the batch | test_training_run_records_each_batch_it_saw |
"""

from __future__ import annotations

import io
import json

import dagster as dg
import pytest

from car_maker_pipeline.data.added_rows import SOURCE, AddedBatch, write_added_rows
from car_maker_pipeline.data.dataset_spec import column
from car_maker_pipeline.data.decoding import DUPLICATE, decode_checked
from car_maker_pipeline.data.maker_dataset import build_maker_dataset
from car_maker_pipeline_tests.support.labeling import picture


def stored_batch(folder, batch_id: str, split: str, rows: list[tuple[bytes, str]]) -> AddedBatch:
    folder.mkdir(parents=True)
    records = []
    for position, (data, maker) in enumerate(rows):
        image, content_hash = decode_checked(data)
        records.append(
            {
                "image": image,
                "maker": maker,
                "source_class": "",
                "model": "",
                "year": -1,
                "content_hash": content_hash,
                "provenance": batch_id,
                "file": f"{maker}/{position}.png",
            }
        )
    write_added_rows(records, folder)
    return AddedBatch(batch_id, split, str(folder), len(records))


def test_batches_join_train_and_validation_and_test_is_untouched(tmp_path, raw_dataset, maker_dataset):
    train_batch = stored_batch(tmp_path / "a", "batch-a", "train", [(picture(1), "BMW"), (picture(2), "AM General")])
    validation_batch = stored_batch(tmp_path / "b", "batch-b", "validation", [(picture(3), "Land Rover")])
    record = build_maker_dataset(
        raw_dataset.load(),
        tmp_path / "ds",
        source_revision=raw_dataset.revision,
        additions=[train_batch, validation_batch],
    )
    built, base = record.load(), maker_dataset.load()
    assert record.rows_per_split["train"] == maker_dataset.rows_per_split["train"] + 2
    assert record.rows_per_split["validation"] == maker_dataset.rows_per_split["validation"] + 1
    assert column(built["train"], "provenance")[-2:] == ["batch-a", "batch-a"]
    assert set(column(built["train"], "provenance")[:-2]) == {SOURCE}
    assert column(built["validation"], "provenance")[-1] == "batch-b"
    for split in ("test", "contrast"):
        assert column(built[split], "content_hash") == column(base[split], "content_hash")
        assert set(column(built[split], "provenance")) == {SOURCE}
    assert built["train"].features["maker_id"].int2str(built["train"][-1]["maker_id"]) == "AM General"
    before, after = record.images_per_maker_before_additions, record.images_per_maker
    assert before["train"] == maker_dataset.images_per_maker["train"]
    assert after["train"]["BMW"] == before["train"]["BMW"] + 1
    assert after["validation"]["Land Rover"] == before["validation"]["Land Rover"] + 1
    assert record.additions == [
        {"batch_id": "batch-a", "split": "train", "rows": 2},
        {"batch_id": "batch-b", "split": "validation", "rows": 1},
    ]


def test_an_addition_already_in_the_dataset_is_dropped_at_build(tmp_path, raw_dataset, maker_dataset):
    test_image = maker_dataset.load()["test"][0]["image"]
    buffer = io.BytesIO()
    test_image.save(buffer, format="PNG")
    batch = stored_batch(tmp_path / "a", "batch-a", "train", [(buffer.getvalue(), "BMW"), (picture(1), "BMW")])
    record = build_maker_dataset(
        raw_dataset.load(), tmp_path / "ds", source_revision=raw_dataset.revision, additions=[batch]
    )
    assert record.rows_per_split["train"] == maker_dataset.rows_per_split["train"] + 1
    [dropped] = [row for row in record.dropped_rows if row["detail"].startswith("batch-a/")]
    assert dropped["reason"] == DUPLICATE and dropped["split"] == "train"


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    """A demo store whose data assets were materialized, then again after a folder was dropped into additions/:
    (home, resources, instance, first result, second result)."""
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
    from car_maker_pipeline.orchestration.assets.labeling import AdditionsFolder, labeled_additions
    from car_maker_pipeline_tests.support.pipeline import materialized_demo_data

    home = tmp_path_factory.mktemp("dropped") / "home"
    resources, instance, first = materialized_demo_data(home, train_per_maker=4, test_per_maker=2, corruptions=[])
    resources = {**resources, "additions": AdditionsFolder()}
    for seed, label in enumerate(["BMW", "bmw", "Rolls-Royce", "Tesla"]):
        (home / "additions" / "new-photos" / label).mkdir(parents=True, exist_ok=True)
        (home / "additions" / "new-photos" / label / f"{seed}.png").write_bytes(picture(seed))
    second = dg.materialize(
        [raw_stanford_cars, labeled_additions, car_maker_dataset], resources=resources, instance=instance
    )
    return home, resources, instance, first, second


def test_dropped_folder_reaches_the_dataset_through_dagster(dropped):
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
    from car_maker_pipeline.orchestration.assets.labeling import labeled_additions

    home, resources, instance, first, second = dropped
    added = second.asset_materializations_for_node("labeled_additions")[0].metadata
    assert (added["num_batches"].value, added["accepted_rows"].value, added["refused_count"].value) == (1, 3, 1)
    metadata = second.asset_materializations_for_node("car_maker_dataset")[0].metadata
    [batch] = metadata["additions"].value
    assert batch["rows"] == 3 and batch["batch_id"] in str(added["batches"].value.records[0].data)
    rows = {r.data["maker"]: r.data for r in metadata["rows_per_maker_before_after_additions"].value.records}
    assert rows["BMW"]["train_after"] - rows["BMW"]["train_before"] == 2
    assert rows["Rolls-Royce"]["train_after"] - rows["Rolls-Royce"]["train_before"] == 1

    def dataset_version(result):
        [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["car_maker_dataset"]]
        return event.materialization.tags["dagster/data_version"]

    assert dataset_version(second) != dataset_version(first)
    assets = [raw_stanford_cars, labeled_additions, car_maker_dataset]
    third = dg.materialize(assets, resources=resources, instance=instance)
    assert dataset_version(third) == dataset_version(second)
    assert len(list((home / "labeled_additions" / "source_index").iterdir())) == 1


@pytest.mark.slow
def test_the_next_training_run_lists_the_batch_among_its_inputs(dropped):
    """lora_checkpoints (2 steps) on the dataset with the dropped batch: its MLflow run's inputs name the batch."""
    from mlflow import MlflowClient

    from car_maker_pipeline.orchestration.assets.training import lora_checkpoints

    home, resources, instance, _, second = dropped
    [batch] = second.asset_materializations_for_node("car_maker_dataset")[0].metadata["additions"].value
    training = {"max_steps": 2, "checkpoint_every_n_steps": 2, "per_device_train_batch_size": 4}
    result = dg.materialize(
        [lora_checkpoints],
        resources=resources,
        instance=instance,
        partition_key="tiny-s|maker",
        run_config={"ops": {"lora_checkpoints": {"config": training}}},
    )
    metadata = result.asset_materializations_for_node("lora_checkpoints")[0].metadata
    assert metadata["additions_batches"].value == [batch["batch_id"]]
    run = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(metadata["mlflow_run_id"].value)
    names = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert f"labeled_additions/{batch['batch_id']}" in names and "car_maker_dataset/train" in names
    assert run.info.status == "FINISHED" and run.data.tags["additions_batches"] == batch["batch_id"]


def test_training_run_records_each_batch_it_saw(tmp_path, raw_dataset):
    """`record_training_inputs` logs train, validation and every batch into the finished training run; the
    registered version's description (`additions_note`) names the batches."""
    from mlflow import MlflowClient

    from car_maker_pipeline.mlflow_store import default_tracking_uri
    from car_maker_pipeline.recording.lineage import additions_note, record_training_inputs
    from car_maker_pipeline.tracking import mlflow_run

    batch = stored_batch(tmp_path / "a", "batch-a", "train", [(picture(1), "BMW"), (picture(2), "BMW")])
    record = build_maker_dataset(raw_dataset.load(), tmp_path / "ds", source_revision="rev", additions=[batch])
    home = tmp_path / "home"
    uri = default_tracking_uri(home)
    with mlflow_run(uri, home, run_name="lora-tiny-s", tags={"model": "tiny-s"}) as run:
        run_id = run.info.run_id
    record_training_inputs(record, uri, home, run_id)
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    contexts = {i.dataset.name: next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs}
    assert contexts == {
        "car_maker_dataset/train": "train",
        "car_maker_dataset/validation": "validation",
        "labeled_additions/batch-a": "train",
    }
    batch_input = next(i for i in inputs if i.dataset.name == "labeled_additions/batch-a")
    assert json.loads(batch_input.dataset.profile)["num_rows"] == 2
    assert "batch-a (2 rows, train)" in additions_note(record)
    record.additions = []
    assert additions_note(record) == ""  # a dataset of the source alone: the description stays general
