"""Evaluation recording as plain functions, called without Dagster on real checkpoints of a tiny model.

The data assets and a 2-step LoRA run (a checkpoint after each step) are materialized once; the
baseline and the checkpoint evaluations are then recorded by calling the domain functions directly.

| case                                        | expected                                                        |
|---------------------------------------------|-----------------------------------------------------------------|
| baseline recorded                           | manifest and MLflow run (tags, params, artifacts) name each other |
| checkpoints recorded                        | best chosen on validation; manifest, MLflow run (certificate in words), registry, card |
| registered version read back by `classify`  | the card's makers, base model, certificate; the best checkpoint's adapter |
| recorded again under another run id         | scores reused (no re-evaluation), a new registered version       |
| robustness off                              | no corruption table in the record, the manifest or MLflow        |
| run left RUNNING by a dead Dagster run       | deleted before recording; another model's run, and a run of another Dagster instance, kept |
| missing lora_checkpoints / baseline / data  | MissingUpstreamError naming it; the model is never loaded        |
| a split the dataset does not have           | ValueError naming the split and the ones there are; no model    |
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.evaluation.answer_policy import CalibrationReport
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.loading import load_model_and_processor
from car_maker_pipeline.orchestration.run_history import run_status
from car_maker_pipeline.recording.baseline import RecordTarget, evaluate_and_record
from car_maker_pipeline.recording.checkpoint_accuracy import evaluate_checkpoints_and_record
from car_maker_pipeline.recording.registry import registered_versions
from car_maker_pipeline.serving.predictor import CARD_FILE
from car_maker_pipeline.store import (
    BASELINE_EVALUATION,
    CAR_MAKER_DATASET,
    CHECKPOINT_ACCURACY,
    LORA_CHECKPOINTS,
    MissingUpstreamError,
    PipelineStore,
)
from car_maker_pipeline_tests.support.pipeline import demo_split_rows, materialized_demo_data

KEY = "tiny-s"
PARTITION = f"{KEY}|maker"
CALIBRATION_ARTIFACTS = ("reliability_diagram.png", "risk_coverage.png", "risk_coverage.parquet")
STEPS = [1, 2]


def _record_baseline(store: PipelineStore, target: RecordTarget, load_model, split: str = "test"):
    """What `baseline_evaluation` records, with its default prompt, called directly."""
    return evaluate_and_record(
        store,
        target,
        load_model,
        asset=BASELINE_EVALUATION,
        model_key=KEY,
        stage="baseline",
        prompt=PromptTemplate(),
        batch_size=8,
        split=split,
    )


@pytest.fixture(scope="module")
def data_store(tmp_path_factory):
    """(store, tracking URI, demo resources, Dagster instance) with the data assets materialized."""
    home = tmp_path_factory.mktemp("recording")
    resources, instance, _ = materialized_demo_data(home, train_per_maker=4, test_per_maker=2, corruptions=["pixelate"])
    return PipelineStore(home), f"sqlite:///{home / 'mlflow.db'}", resources, instance


@pytest.fixture(scope="module")
def trained(data_store):
    """(store, tracking URI, base model folder, recorded baseline) after a 2-step LoRA run of tiny-s."""
    from car_maker_pipeline.orchestration.assets.training import lora_checkpoints

    store, uri, resources, instance = data_store
    model_dir = resources["models"].path_or_id(KEY, store)
    loaded = load_model_and_processor(model_dir)
    baseline = _record_baseline(store, RecordTarget(uri, "baseline-run"), lambda: loaded)
    training = {"max_steps": STEPS[-1], "checkpoint_every_n_steps": 1, "per_device_train_batch_size": 4}
    result = dg.materialize(
        [lora_checkpoints],
        resources=resources,
        instance=instance,
        partition_key=PARTITION,
        run_config={"ops": {"lora_checkpoints": {"config": training}}},
    )
    assert result.success
    return store, uri, model_dir, baseline


def _record(trained, run_id: str, robustness: bool = True, instance=None):
    store, uri, model_dir, _ = trained
    status = run_status(instance, dg.AssetKey(CHECKPOINT_ACCURACY), KEY) if instance is not None else None
    return evaluate_checkpoints_and_record(
        store,
        RecordTarget(uri, run_id, status),
        lambda: load_model_and_processor(model_dir),
        model_key=KEY,
        prompt=PromptTemplate(),
        batch_size=8,
        robustness=robustness,
    )


def _runs(uri: str, filter_string: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("car_maker_pipeline")
    return client.search_runs([experiment.experiment_id], filter_string=filter_string)


def _artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    client, found = mlflow.MlflowClient(uri), set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(uri, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_baseline_recording_names_its_run_in_the_manifest(trained):
    store, uri, _, baseline = trained
    manifest = store.read_manifest(BASELINE_EVALUATION, KEY)
    assert manifest["mlflow_run_id"] == baseline.mlflow_run_id
    test_rows = demo_split_rows(2)  # the data_store fixture's test split
    assert manifest["summary"]["num_images"] == test_rows == baseline.report.summary.num_images
    assert Path(manifest["out_dir"]) == store.asset_dir(BASELINE_EVALUATION, KEY) / "baseline-run"
    (run,) = _runs(uri, "tags.stage = 'baseline'")
    assert run.info.run_id == baseline.mlflow_run_id and run.info.run_name == f"baseline-{KEY}"
    assert run.data.tags["dagster_run_id"] == "baseline-run" and run.data.tags["model_key"] == KEY
    assert run.data.params["split"] == "test" and run.data.params["num_images"] == str(test_rows)
    assert run.data.metrics["accuracy"] == pytest.approx(manifest["summary"]["accuracy"])
    assert {"predictions.parquet", "per_maker.parquet", "confusion_matrix.png", "misclassified.png"} <= _artifacts(
        uri, run.info.run_id
    )


@pytest.mark.slow
def test_checkpoints_are_scored_and_the_best_on_validation_is_registered(trained):
    store, uri, model_dir, baseline = trained
    record = _record(trained, "checkpoints-run")
    table = record.scores.table
    assert list(table["step"]) == STEPS
    assert record.best_val_accuracy == table["val_accuracy"].max()
    assert record.baseline_accuracy == baseline.report.summary.accuracy
    assert record.beats_baseline == (record.best_test_accuracy > record.baseline_accuracy)
    assert pd.read_parquet(record.table_path).equals(table) and record.chart_path.read_bytes()[:4] == b"\x89PNG"
    assert list(record.scores.robustness["corruption"]) == ["pixelate"]

    training = store.read_manifest(LORA_CHECKPOINTS, KEY)
    manifest = store.read_manifest(CHECKPOINT_ACCURACY, KEY)
    calibrations = {
        key: CalibrationReport.from_json(manifest.pop(key)) for key in ("calibration", "baseline_calibration")
    }
    for recorded, expected in (
        (calibrations["calibration"], record.best_calibration),
        (calibrations["baseline_calibration"], baseline.calibration_report),
    ):
        assert recorded.metrics() == pytest.approx(expected.metrics(), nan_ok=True)
        assert (recorded.statement, recorded.method) == (expected.statement, expected.method)
    assert manifest == {
        "table": str(record.table_path),
        "best_step": record.best_step,
        "best_checkpoint": training["checkpoints"][str(record.best_step)],
        "registered_version": record.registered_version,
        "mlflow_run_id": record.mlflow_run_id,
        "robustness": record.scores.robustness.to_dict("records"),
        "baseline_accuracy": record.baseline_accuracy,
        "task": "maker",
    }
    # Every checkpoint is judged on calibration and coverage at the target precision too.
    for column in ("top3_accuracy", "ece", "ece_calibrated", "temperature", "val_coverage_at_target"):
        assert table[column].notna().all(), column
    assert (table["top3_accuracy"] >= table["accuracy"]).all()
    best = record.best_calibration
    assert table.set_index("step").loc[record.best_step, "coverage_at_target"] == best.coverage

    (run,) = _runs(uri, "tags.dagster_run_id = 'checkpoints-run'")
    assert run.info.run_id == record.mlflow_run_id and run.info.run_name == f"checkpoints-{KEY}"
    assert run.data.tags["stage"] == "checkpoint_accuracy"
    assert run.data.tags["training_run_id"] == training["mlflow_run_id"]
    assert run.data.params["best_step"] == str(record.best_step) and run.data.params["num_checkpoints"] == "2"
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == list(zip(STEPS, table["val_accuracy"]))
    assert run.data.metrics["baseline_test_accuracy"] == pytest.approx(record.baseline_accuracy)
    ece = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "test_ece")
    assert [m.step for m in sorted(ece, key=lambda m: m.step)] == STEPS
    assert [m.value for m in sorted(ece, key=lambda m: m.step)] == pytest.approx(list(table["ece"]))
    assert run.data.metrics["best_coverage"] == pytest.approx(record.best_calibration.coverage)
    # What the threshold promises, in words and numbers: delta, the bound, the answered validation images.
    assert run.data.tags["best_certification"] == record.best_calibration.statement
    assert run.data.tags["best_certification_method"].startswith("Learn then Test")
    assert run.data.params["delta"] == "0.05" and run.data.metrics["best_delta"] == 0.05
    assert run.data.metrics["best_val_answered"] == record.best_calibration.val_answered
    assert run.data.metrics["best_comparisons"] == len(STEPS)  # each checkpoint certified at delta / 2
    assert {
        f"checkpoint_accuracy_{KEY}.json",
        f"robustness_{KEY}.json",
        "accuracy_by_step.png",
        "checkpoint_accuracy.parquet",
        # every checkpoint's reliability diagram and risk-coverage curve, and the best one's at the top
        *(f"calibration/step-{step}/{name}" for step in STEPS for name in CALIBRATION_ARTIFACTS),
        *(f"calibration/{name}" for name in CALIBRATION_ARTIFACTS),
    } <= _artifacts(uri, run.info.run_id)  # the classifier itself is an MLflow logged model (pyfunc) of this run

    assert record.registered_model == f"car-maker-{KEY}"
    (version,) = [v for v in registered_versions(uri, record.registered_model) if v.run_id == record.mlflow_run_id]
    assert str(version.version) == record.registered_version
    assert version.tags["step"] == str(record.best_step) and version.tags["dagster_run_id"] == "checkpoints-run"
    assert float(version.tags["val_accuracy"]) == pytest.approx(record.best_val_accuracy, abs=1e-4)
    assert version.tags["base_model_id"] == model_dir


@pytest.mark.slow
def test_the_registered_version_is_what_classify_loads(trained):
    from car_maker_pipeline.recording.registry import ADAPTER_ARTIFACT

    store, uri, model_dir, _ = trained
    record = _record(trained, "classify-run")
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{record.registered_model}/{record.registered_version}"))
    assert (local / "MLmodel").exists()  # a standard MLflow model, loadable with mlflow.pyfunc.load_model
    adapter_dir = next(local.rglob(ADAPTER_ARTIFACT))
    best = Path(store.read_manifest(LORA_CHECKPOINTS, KEY)["checkpoints"][str(record.best_step)])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (adapter_dir / name).read_bytes() == (best / name).read_bytes()
    card = json.loads((adapter_dir / CARD_FILE).read_text())
    assert card["makers"] == MakerDataset.current(store).makers
    assert card["base_model"] == model_dir and card["step"] == record.best_step
    # The temperature, the certified threshold and what it promises travel with the model.
    calibrated = record.best_calibration
    assert card["temperature"] == calibrated.temperature and card["confidence_threshold"] == calibrated.threshold
    assert card["target_precision"] == 0.99 and card["delta"] == 0.05
    assert card["certification"] == calibrated.statement
    assert card["certified_precision"] == (0.99 if calibrated.certified else None)
    if not calibrated.certified:  # a few dozen validation images cannot certify 99%: nothing is answered
        assert card["confidence_threshold"] > 1 and "99% precision cannot be certified with" in card["certification"]


@pytest.mark.slow
def test_recording_again_reuses_the_scores_and_adds_a_version(trained):
    first = _record(trained, "first-run")
    summaries = sorted(first.table_path.parent.rglob("summary.json"))
    written = {path: path.stat().st_mtime_ns for path in summaries}
    again = _record(trained, "second-run")
    assert {path: path.stat().st_mtime_ns for path in summaries} == written, "a cached score was evaluated again"
    assert again.scores.table.equals(first.scores.table) and again.best_step == first.best_step
    assert int(again.registered_version) == int(first.registered_version) + 1
    assert again.mlflow_run_id != first.mlflow_run_id


@pytest.mark.slow
def test_without_robustness_no_corruption_table_is_recorded(trained):
    store, uri, _, _ = trained
    record = _record(trained, "no-robustness-run", robustness=False)
    assert record.scores.robustness.empty
    assert store.read_manifest(CHECKPOINT_ACCURACY, KEY)["robustness"] == []
    assert f"robustness_{KEY}.json" not in _artifacts(uri, record.mlflow_run_id)


@pytest.mark.slow
def test_a_run_left_running_by_a_dead_dagster_run_is_deleted_first(trained):
    store, uri, _, _ = trained
    training_run = store.read_manifest(LORA_CHECKPOINTS, KEY)["mlflow_run_id"]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("car_maker_pipeline").experiment_id
    tags = {"model_key": KEY, "stage": "checkpoint_accuracy", "training_run_id": training_run}
    instance = dg.DagsterInstance.ephemeral()
    killed = instance.create_run_for_job(dg.GraphDefinition("scoring").to_job())
    instance.report_run_failed(killed)  # this instance's run, ended: its RUNNING MLflow run was cut short
    orphan = client.create_run(experiment, tags={**tags, "dagster_run_id": killed.run_id}).info.run_id
    other_model = client.create_run(experiment, tags={**tags, "model_key": "tiny-m", "dagster_run_id": killed.run_id})
    other_instance = client.create_run(experiment, tags={**tags, "dagster_run_id": "a-run-of-another-instance"})
    record = _record(trained, "after-kill-run", instance=instance)
    assert client.get_run(orphan).info.lifecycle_stage == "deleted"
    assert client.get_run(other_model.info.run_id).info.lifecycle_stage == "active"
    assert client.get_run(other_instance.info.run_id).info.lifecycle_stage == "active"  # not provably dead
    assert client.get_run(record.mlflow_run_id).info.status == "FINISHED"


def _never_loaded():
    raise AssertionError("the model was loaded although an input is missing")


# Only their presence matters here: each is read before the next, and all before the model loads.
MINIMAL_MANIFESTS = {LORA_CHECKPOINTS: {}, BASELINE_EVALUATION: {"summary": {"accuracy": 0.5}}}


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ((), LORA_CHECKPOINTS),
        ((LORA_CHECKPOINTS,), BASELINE_EVALUATION),
        ((LORA_CHECKPOINTS, BASELINE_EVALUATION), CAR_MAKER_DATASET),
    ],
)
def test_a_missing_input_fails_before_any_model_work(tmp_path, present, missing):
    store = PipelineStore(tmp_path / "home")
    for asset in present:
        store.write_manifest(asset, MINIMAL_MANIFESTS[asset], partition=KEY)
    with pytest.raises(MissingUpstreamError, match=missing):
        evaluate_checkpoints_and_record(
            store,
            RecordTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", "missing-run"),
            _never_loaded,
            model_key=KEY,
            prompt=PromptTemplate(),
            batch_size=8,
        )
    assert not store.asset_dir(CHECKPOINT_ACCURACY).exists()


@pytest.mark.parametrize("split", ["validaton", "Test", ""])
def test_an_unknown_split_fails_before_any_model_work(data_store, split):
    store, uri, _, _ = data_store
    with pytest.raises(ValueError, match=f"no split '{split}'.*'train'.*'validation'.*'test'"):
        _record_baseline(store, RecordTarget(uri, "unknown-split-run"), _never_loaded, split=split)


def test_baseline_without_a_maker_dataset_fails_before_any_model_work(tmp_path):
    with pytest.raises(MissingUpstreamError, match=CAR_MAKER_DATASET):
        _record_baseline(
            PipelineStore(tmp_path / "empty"), RecordTarget("sqlite:///unused.db", "no-data-run"), _never_loaded
        )
