"""A car_maker_dataset that fails a blocking check never becomes what downstream assets read.

Through the real data assets (`dg.materialize`) on local Stanford-Cars-shaped folders, a good
source is materialized first (except in the first-build case), then a bad one:

| bad source                                            | refused by                  | afterwards                                                       |
|-------------------------------------------------------|-----------------------------|------------------------------------------------------------------|
| 4 test images copied byte for byte into train         | check no_test_leakage       | previous dataset current; failure names the check and that dataset; failed check evaluation recorded |
| 4 test images re-encoded as PNG into train (same pixels, other bytes) | check no_test_leakage | same                                                   |
| one maker's training images removed (in test only)    | the build (MakerDatasetError) | previous dataset current; error names the maker and that dataset |
| test images in train on a first-ever build            | check no_test_leakage       | nothing current: MakerDataset.current(store) raises MissingUpstreamError naming the check |
| the good source again, after a refusal                | (passes)                    | made current; the refusal record is cleared                       |
| baseline_evaluation materialized after a refusal      | -                           | scores the previous dataset (its path, revision and test rows)     |

And each blocking check failing on its own (hand-made datasets, the domain function without Dagster):
test row in train, a test maker missing from train, an empty validation split, a maker list naming a
maker that has no rows: that check alone fails, and the dataset is not made current.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import dagster as dg
import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.data.makers import parse_class_name
from car_maker_pipeline.data.promotion import promote_if_checks_pass
from car_maker_pipeline.data.quality import BLOCKING_CHECKS
from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource
from car_maker_pipeline.store import CAR_MAKER_DATASET, MissingUpstreamError, PipelineStore


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    from car_maker_pipeline.offline.demo_source import generate_demo_source

    return generate_demo_source(
        tmp_path_factory.mktemp("sources") / "good", train_per_maker=6, test_per_maker=3, corruptions=(), seed=5
    )


def _split_tables(folder: Path) -> dict[str, pa.Table]:
    return {path.name.split("-")[0]: pq.read_table(path) for path in sorted((folder / "data").glob("*.parquet"))}


def _write_source(folder: Path, tables: dict[str, pa.Table]) -> Path:
    """A local source (data/<split>-00000-of-00001.parquet), keeping the Hugging Face features in each schema."""
    (folder / "data").mkdir(parents=True)
    for split, table in tables.items():
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def _as_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()


def leaked_source(good: Path, out: Path, reencode: bool) -> Path:
    tables = _split_tables(good)
    leaked = tables["test"].slice(0, 4)
    if reencode:
        images = [{"bytes": _as_png(row["bytes"]), "path": None} for row in leaked.column("image").to_pylist()]
        leaked = leaked.set_column(0, "image", pa.array(images, type=leaked.schema.field("image").type))
    tables["train"] = pa.concat_tables([tables["train"], leaked.cast(tables["train"].schema)])
    return _write_source(out, tables)


def source_without_a_training_maker(good: Path, out: Path) -> tuple[Path, str]:
    tables = _split_tables(good)
    names = json.loads(tables["train"].schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    makers = [parse_class_name(names[label]).maker for label in tables["train"].column("label").to_pylist()]
    dropped = makers[0]
    tables["train"] = tables["train"].filter(pa.array([maker != dropped for maker in makers]))
    return _write_source(out, tables), dropped


def materialize_data(home: Path, source: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [raw_stanford_cars, car_maker_dataset],
        resources={
            "store": StoreResource(home=str(home)),
            "source": StanfordCarsSource(profile="demo", path_or_id=str(source)),
        },
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failure = result.failure_data_for_node(CAR_MAKER_DATASET)
    user = failure.user_failure_data
    return (user.description if user is not None else "") + failure.error.to_string()


@pytest.fixture
def home_with_good_dataset(tmp_path, good_source):
    home = tmp_path / "home"
    result = materialize_data(home, good_source)
    assert result.success
    return home, MakerDataset.current(PipelineStore(home))


@pytest.mark.parametrize("reencode", [False, True], ids=["same-bytes", "same-pixels-png"])
def test_test_images_in_train_leave_the_previous_dataset_current(
    tmp_path, good_source, home_with_good_dataset, reencode
):
    home, good = home_with_good_dataset
    manifest = (home / CAR_MAKER_DATASET / "current.json").read_bytes()

    result = materialize_data(home, leaked_source(good_source, tmp_path / "leaked", reencode))

    assert not result.success
    evaluations = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert set(evaluations) == set(BLOCKING_CHECKS)
    assert not evaluations["no_test_leakage"].passed
    assert evaluations["no_test_leakage"].metadata["shared_images"].value == 4
    assert all(check.passed for name, check in evaluations.items() if name != "no_test_leakage")
    assert not result.asset_materializations_for_node(CAR_MAKER_DATASET)
    message = failure_message(result)
    assert "no_test_leakage" in message and f"previous dataset {good.path}" in message and "remains current" in message

    store = PipelineStore(home)
    assert MakerDataset.current(store) == good  # what baseline_evaluation and lora_checkpoints read
    assert (home / CAR_MAKER_DATASET / "current.json").read_bytes() == manifest
    assert store.read_rejection(CAR_MAKER_DATASET)["failed_checks"] == ["no_test_leakage"]


def test_a_maker_missing_from_train_leaves_the_previous_dataset_current(tmp_path, good_source, home_with_good_dataset):
    home, good = home_with_good_dataset
    source, maker = source_without_a_training_maker(good_source, tmp_path / "no_maker")

    result = materialize_data(home, source)

    assert not result.success
    message = failure_message(result)
    assert maker in message and f"previous dataset {good.path}" in message and "remains current" in message
    assert MakerDataset.current(PipelineStore(home)) == good


def test_a_refused_first_build_leaves_no_current_dataset(tmp_path, good_source):
    home = tmp_path / "home"
    result = materialize_data(home, leaked_source(good_source, tmp_path / "leaked", reencode=False))

    assert not result.success
    assert "no dataset is current" in failure_message(result)
    assert not (home / CAR_MAKER_DATASET / "current.json").exists()
    with pytest.raises(MissingUpstreamError, match=r"No version of `car_maker_dataset` is current.*no_test_leakage"):
        MakerDataset.current(PipelineStore(home))


def test_a_passing_build_after_a_refusal_becomes_current(tmp_path, good_source):
    home = tmp_path / "home"
    assert not materialize_data(home, leaked_source(good_source, tmp_path / "leaked", reencode=False)).success
    result = materialize_data(home, good_source)

    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    store = PipelineStore(home)
    assert (
        MakerDataset.current(store).path
        == result.asset_materializations_for_node(CAR_MAKER_DATASET)[0].metadata["path"].value
    )
    assert store.read_rejection(CAR_MAKER_DATASET) is None


# ---------------------------------------------------------------------------------------------------
# Each blocking check on its own, through the domain function (no Dagster)
# ---------------------------------------------------------------------------------------------------


def _test_row_in_train(data: datasets.DatasetDict) -> datasets.DatasetDict:
    data["train"] = datasets.concatenate_datasets([data["train"], data["test"].select([0])])
    return data


def _test_maker_missing_from_train(data: datasets.DatasetDict) -> datasets.DatasetDict:
    maker = data["test"][0]["maker"]
    data["train"] = data["train"].filter(lambda row: row["maker"] != maker)
    return data


def _empty_validation(data: datasets.DatasetDict) -> datasets.DatasetDict:
    data["validation"] = data["validation"].select([])
    return data


def _maker_list_with_a_maker_without_rows(data: datasets.DatasetDict) -> datasets.DatasetDict:
    names = [*data["train"].features["maker_id"].names, "Zz Phantom Motors"]
    return datasets.DatasetDict(
        {split: part.cast_column("maker_id", datasets.ClassLabel(names=names)) for split, part in data.items()}
    )


@pytest.mark.parametrize(
    ("spoil", "failing"),
    [
        (_test_row_in_train, "no_test_leakage"),
        (_test_maker_missing_from_train, "test_makers_seen_in_train"),
        (_empty_validation, "no_empty_split"),
        (_maker_list_with_a_maker_without_rows, "maker_list_matches_data"),
    ],
)
def test_each_blocking_check_alone_keeps_a_dataset_from_becoming_current(tmp_path, maker_dataset, spoil, failing):
    store = PipelineStore(tmp_path / "home")
    store.write_manifest(CAR_MAKER_DATASET, maker_dataset.to_json())
    spoiled_dir = tmp_path / "spoiled"
    spoilt = spoil(maker_dataset.load())
    spoilt.save_to_disk(str(spoiled_dir), num_shards=dict.fromkeys(spoilt, 1))  # an empty split needs its shard
    spoiled = type(maker_dataset)(**{**maker_dataset.to_json(), "path": str(spoiled_dir)})

    promotion = promote_if_checks_pass(store, spoiled)

    assert not promotion.promoted
    assert [outcome.name for outcome in promotion.outcomes if not outcome.passed] == [failing]
    assert failing in promotion.refusal and f"previous dataset {maker_dataset.path}" in promotion.refusal
    assert MakerDataset.current(store).path == maker_dataset.path
    shutil.rmtree(spoiled_dir)


def test_after_a_refusal_the_baseline_scores_the_previous_dataset(tmp_path, good_source, home_with_good_dataset):
    """Downstream for real: a baseline materialized after the refusal evaluates the good dataset's rows."""
    from car_maker_pipeline.mlflow_store import default_tracking_uri
    from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation
    from car_maker_pipeline.orchestration.resources import MlflowTracking, VisionLanguageModels
    from car_maker_pipeline.store import BASELINE_EVALUATION

    home, good = home_with_good_dataset
    assert not materialize_data(home, leaked_source(good_source, tmp_path / "leaked", reencode=False)).success
    result = dg.materialize(
        [baseline_evaluation],
        resources={
            "store": StoreResource(home=str(home)),
            "models": VisionLanguageModels(profile="demo"),
            "mlflow_tracking": MlflowTracking(tracking_uri=default_tracking_uri(home)),
        },
        instance=dg.DagsterInstance.ephemeral(),
        partition_key="tiny-s|maker",
    )
    assert result.success
    manifest = PipelineStore(home).read_manifest(BASELINE_EVALUATION, "tiny-s")
    assert manifest["params"]["dataset_path"] == Path(good.path).name
    assert manifest["params"]["dataset_revision"] == good.source_revision
    assert manifest["summary"]["num_images"] == good.rows_per_split["test"]
