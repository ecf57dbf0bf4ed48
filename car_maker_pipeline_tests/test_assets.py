"""The Dagster assets, run in-process against a throwaway instance and store."""

import dagster as dg
import mlflow
import pytest

from car_maker_pipeline.evaluation.settings import DEMO_TARGET_PRECISION
from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation
from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
from car_maker_pipeline.orchestration.resources import MlflowTracking
from car_maker_pipeline.tracking import TrackingUnavailableError
from car_maker_pipeline_tests.support.pipeline import demo_split_rows, materialized_demo_data


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Materialize the data assets once on a small generated demo source."""
    home = tmp_path_factory.mktemp("pipeline")
    return (
        home,
        *materialized_demo_data(home, train_per_maker=12, test_per_maker=5, corruptions=["pixelate"]),
    )


def test_data_assets_carry_their_metadata(pipeline):
    _, resources, _, result = pipeline
    # The demo profile's default balance: makers in their real proportions (72 train rows, 31 test:
    # AM General gets the minimum of 2 test images instead of its 1.1).
    assert resources["source"].demo_balance == "stanford"
    train, test = demo_split_rows(12), demo_split_rows(5)
    assert (train, test) == (72, 31)
    raw = result.asset_materializations_for_node("raw_stanford_cars")[0].metadata
    assert raw["revision"].value.startswith("sha256-")
    assert raw["rows_per_split"].value == {"train": train, "test": test, "pixelate": test}
    makers = result.asset_materializations_for_node("car_maker_dataset")[0].metadata
    assert makers["num_makers"].value == 6
    assert {"Aston Martin", "Land Rover", "AM General"} <= set(makers["makers"].value)
    assert makers["rows_test"].value == test and makers["rows_pixelate"].value == test
    assert makers["rows_train"].value + makers["rows_validation"].value == train
    assert makers["dropped_count"].value == 0
    table = makers["images_per_maker"].value
    columns = {column.name: column.type for column in table.schema.columns}
    assert columns["maker"] == "string" and columns["validation"] == columns["test"] == "int"
    by_maker = {record.data["maker"]: record.data for record in table.records}
    assert "Land Rover" in by_maker and by_maker["total"]["test"] == makers["rows_test"].value
    assert sum(row["test"] for name, row in by_maker.items() if name != "total") == makers["rows_test"].value
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 4 and all(check.passed for check in checks)


def test_rematerializing_an_unchanged_source_reuses_the_stored_copy(pipeline):
    home, resources, instance, first = pipeline
    again = dg.materialize([raw_stanford_cars, car_maker_dataset], resources=resources, instance=instance)
    raw = again.asset_materializations_for_node("raw_stanford_cars")[0].metadata
    assert raw["cache_hit"].value is True
    assert (
        raw["revision"].value
        == first.asset_materializations_for_node("raw_stanford_cars")[0].metadata["revision"].value
    )
    assert again.asset_materializations_for_node("car_maker_dataset")[0].metadata["cache_hit"].value is True


def _baseline(pipeline, config: dict, partition: str = "tiny-s|maker"):
    """(result, metadata) of one baseline_evaluation partition with `config` as its run config."""
    _, resources, instance, _ = pipeline
    run_config = {"ops": {"baseline_evaluation": {"config": config}}}
    result = dg.materialize(
        [baseline_evaluation], resources=resources, instance=instance, partition_key=partition, run_config=run_config
    )
    return result, result.asset_materializations_for_node("baseline_evaluation")[0].metadata


def test_baseline_partition_reports_metrics_and_an_mlflow_run(pipeline):
    home = pipeline[0]
    result, metadata = _baseline(pipeline, {"batch_size": 8})
    for key in (
        "accuracy",
        "accuracy_ci_low",
        "accuracy_ci_high",
        "num_images",
        "images_per_second",
        "per_maker_accuracy",
        "confusion_matrix",
    ):
        assert key in metadata, key
    assert metadata["num_images"].value == demo_split_rows(5)  # the whole test split
    assert metadata["accuracy_ci_low"].value <= metadata["accuracy"].value <= metadata["accuracy_ci_high"].value
    assert metadata["confusion_matrix"].value.startswith("![confusion matrix](data:image/png;base64,")
    # What the evaluator computed: tiny-s pictures are 128x96 -> 48 image tokens; two passes per batch
    # (the prompts, then every maker's answer at once); padding only where texts differ.
    assert metadata["image_tokens_mean"].value == pytest.approx(48) and metadata["image_tokens_p95"].value == 48
    assert metadata["forward_passes_per_image"].value == 2
    assert 1.0 <= metadata["padded_to_real_tokens"].value < 1.1
    assert metadata["image_token_budget"].value == {
        "image_min_tokens": 16,
        "image_max_tokens": 48,
        "image_splitting": False,
    }

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("car_maker_pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.dagster_run_id = '{result.run_id}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["accuracy"] == pytest.approx(metadata["accuracy"].value)
    assert {"accuracy_ci_low", "accuracy_ci_high", "macro_accuracy", "images_per_second"} <= set(run.data.metrics)
    assert run.data.metrics["padded_to_real_tokens"] == pytest.approx(metadata["padded_to_real_tokens"].value)
    # Probabilities over every maker: calibrated on validation, measured on test, in metadata and MLflow.
    for key in ("top1_accuracy", "top3_accuracy", "log_loss", "ece", "ece_calibrated", "temperature", "coverage"):
        assert run.data.metrics[key] == pytest.approx(metadata[key].value), key
    assert metadata["top1_accuracy"].value == pytest.approx(metadata["accuracy"].value)
    assert metadata["top1_accuracy"].value <= metadata["top3_accuracy"].value <= 1
    # The demo profile's target; a random base model on a few validation images certifies nothing, and says so.
    assert metadata["target_precision"].value == DEMO_TARGET_PRECISION and 0 <= metadata["coverage"].value <= 1
    assert metadata["delta"].value == 0.05 and metadata["certification_method"].value.startswith("Learn then Test")
    if not metadata["certified"].value:
        assert metadata["coverage"].value == 0 and metadata["threshold"].value > 1
        assert f"{DEMO_TARGET_PRECISION:.0%} precision cannot be certified with" in metadata["certification"].value
    assert run.data.tags["certification"] == metadata["certification"].value
    curve = metadata["risk_coverage"].value
    assert {c.name: c.type for c in curve.schema.columns} == {
        "threshold": "float",
        "answered": "int",
        "coverage": "float",
        "accuracy": "float",
    }
    coverages = [record.data["coverage"] for record in curve.records]
    assert coverages == sorted(coverages) and 0 < coverages[-1] <= 1  # answered share grows as the threshold falls
    assert metadata["reliability_diagram"].value.startswith("![reliability diagram](data:image/png;base64,")
    per_maker = metadata["per_maker_accuracy"].value
    assert {c.name: c.type for c in per_maker.schema.columns}["accuracy"] == "float"
    assert run.data.params["image_max_tokens"] == "48"
    assert {
        "model_id",
        "model_revision",
        "dataset_revision",
        "prompt_hash",
        "num_images",
        "batch_size",
        "device",
    } <= set(run.data.params)
    assert run.data.params["batch_size"] == "8" and run.data.params["device"] == "cpu"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"predictions.parquet", "per_maker.parquet", "confusion_matrix.png", "misclassified.png"} <= artifacts


def test_unreachable_mlflow_fails_before_any_model_work(pipeline):
    home, resources, instance, _ = pipeline
    broken = {**resources, "mlflow_tracking": MlflowTracking(tracking_uri="http://127.0.0.1:9")}
    with pytest.raises(TrackingUnavailableError, match="127.0.0.1:9"):
        dg.materialize([baseline_evaluation], resources=broken, instance=instance, partition_key="tiny-m|maker")
    assert not any((home / "demo_models").glob("tiny-m*")), "the model was built although MLflow was down"


def test_a_prompt_without_the_maker_list_is_rejected_before_model_work(pipeline):
    home, resources, instance, _ = pipeline
    config = {"ops": {"baseline_evaluation": {"config": {"user_prompt": "Which maker?"}}}}
    with pytest.raises(Exception, match=r"\{makers\}"):
        dg.materialize(
            [baseline_evaluation],
            resources=resources,
            instance=instance,
            partition_key="tiny-l|maker",
            run_config=config,
        )
    assert not any((home / "demo_models").glob("tiny-l*"))


@pytest.mark.parametrize(
    ("budget", "message"),
    [({"min_image_tokens": 64, "max_image_tokens": 16}, "min_image_tokens"), ({"max_image_tokens": 0}, "at least 1")],
)
def test_an_impossible_image_token_budget_is_rejected_before_model_work(pipeline, budget, message):
    home, resources, instance, _ = pipeline
    config = {"ops": {"baseline_evaluation": {"config": budget}}}
    with pytest.raises(Exception, match=message):
        dg.materialize(
            [baseline_evaluation],
            resources=resources,
            instance=instance,
            partition_key="tiny-l|maker",
            run_config=config,
        )
    assert not any((home / "demo_models").glob("tiny-l*"))


def test_the_image_token_budget_is_applied_and_recorded(pipeline):
    _, metadata = _baseline(pipeline, {"max_image_tokens": 24, "max_images": 8})
    assert metadata["image_token_budget"].value["image_max_tokens"] == 24
    assert metadata["image_tokens_mean"].value <= 24


# What a materialization leaves in the event log, and where it points:
#
# | case                                   | expected                                                        |
# |----------------------------------------|-----------------------------------------------------------------|
# | a baseline materialization's metadata  | at most about 50 KB serialized (charts inline as small copies)   |
# | MLflow UI address configured           | url metadata to the run, under that address                     |
# | local store, no UI address             | no link (it would lead nowhere)                                 |
# | the same evaluation again              | the same data version (named by its inputs, not by the run)     |
# | another image-token budget             | another data version                                            |
# | the evaluation's MLflow run            | system metrics (CPU, memory) sampled while it scored            |
METADATA_BUDGET_BYTES = 50_000


def test_an_evaluation_links_to_its_run_stays_lean_and_is_versioned_by_its_inputs(pipeline, monkeypatch):
    from dagster._serdes import serialize_value

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    home, resources, instance, _ = pipeline
    resources = {**resources, "mlflow_tracking": MlflowTracking(ui_url="http://mlflow.example:5000/")}
    run_config = {"ops": {"baseline_evaluation": {"config": {"max_images": 12}}}}

    def materialize(config=run_config):
        result = dg.materialize(
            [baseline_evaluation],
            resources=resources,
            instance=instance,
            partition_key="tiny-s|maker",
            run_config=config,
        )
        return result.asset_materializations_for_node("baseline_evaluation")[0]

    first, again = materialize(), materialize()
    metadata = first.metadata
    size = len(serialize_value(metadata))
    assert size <= METADATA_BUDGET_BYTES, f"{size} bytes of metadata"
    assert metadata["confusion_matrix"].value.startswith("![confusion matrix](data:image/png;base64,")
    run_id = metadata["mlflow_run_id"].value
    link = metadata["mlflow_run"].value
    assert link.startswith("http://mlflow.example:5000/#/experiments/") and link.endswith(f"/runs/{run_id}")
    assert first.tags["dagster/data_version"] == again.tags["dagster/data_version"]
    other = materialize({"ops": {"baseline_evaluation": {"config": {"max_images": 12, "max_image_tokens": 24}}}})
    assert other.tags["dagster/data_version"] != first.tags["dagster/data_version"]

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    sampled = {key for key in client.get_run(run_id).data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= sampled

    local = dg.materialize(
        [baseline_evaluation],
        resources={**resources, "mlflow_tracking": MlflowTracking(ui_url=None)},
        instance=instance,
        partition_key="tiny-s|maker",
        run_config=run_config,
    )
    assert "mlflow_run" not in local.asset_materializations_for_node("baseline_evaluation")[0].metadata
