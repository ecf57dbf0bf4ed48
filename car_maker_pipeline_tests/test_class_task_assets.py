"""The task dimension: the class task (make, model and year) run through the Dagster assets, beside the maker task.

One module fixture materializes, for tiny-s on a small demo source, the class task's baseline, a short LoRA
run, its checkpoint scores and registration, and the incoming images classified by its champion; the tests
read what each step left (metadata, store folders, the registry) and what the served model answers.
"""

import io

import dagster as dg
import pytest

from car_maker_pipeline.data.tasks import CLASS, MAKER, TaskError
from car_maker_pipeline.orchestration.partitions import model_and_task, model_partitions, partition_key
from car_maker_pipeline.recording.registry import registered_name
from car_maker_pipeline.store import BASELINE_EVALUATION, CHECKPOINT_ACCURACY, LORA_CHECKPOINTS, PipelineStore

MODEL = "tiny-s"
CLASS_KEY = f"{MODEL}|class"
SHORT_TRAINING = {"max_steps": 4, "checkpoint_every_n_steps": 2, "per_device_train_batch_size": 8}
LEVELS = {"class", "maker", "unsure"}


# | partition key  | model  | task  | store folder  | registered model |
PARTITIONS = [
    ("tiny-s|maker", "tiny-s", MAKER, "tiny-s", "car-maker-tiny-s"),
    ("tiny-s|class", "tiny-s", CLASS, "tiny-s@class", "car-class-tiny-s"),
    ("tiny-l|class", "tiny-l", CLASS, "tiny-l@class", "car-class-tiny-l"),
]


@pytest.mark.parametrize(("key", "model", "task", "folder", "registered"), PARTITIONS)
def test_a_partition_key_names_its_model_task_folder_and_registered_model(key, model, task, folder, registered):
    assert model_and_task(key) == (model, task)
    assert str(partition_key(model, task)) == key and key in model_partitions.get_partition_keys()
    assert task.partition(model) == folder
    assert registered_name(model, task) == registered


def test_an_unknown_task_in_a_key_is_refused():
    with pytest.raises(Exception, match="tiny-s|colour"):
        model_and_task("tiny-s|colour")


@pytest.fixture(scope="module")
def class_chain(tmp_path_factory):
    from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation
    from car_maker_pipeline.orchestration.assets.evaluation import checkpoint_accuracy
    from car_maker_pipeline.orchestration.assets.serving import IncomingImages, maker_predictions
    from car_maker_pipeline.orchestration.assets.training import lora_checkpoints
    from car_maker_pipeline_tests.support.pipeline import materialized_demo_data

    home = tmp_path_factory.mktemp("class_task")
    resources, instance, _ = materialized_demo_data(home, train_per_maker=10, test_per_maker=4, corruptions=[])
    resources = {**resources, "incoming_images": IncomingImages(path=str(home / "incoming"))}
    _write_incoming(home)
    results = {}
    for asset, config in (
        (baseline_evaluation, {}),
        (lora_checkpoints, SHORT_TRAINING),
        (checkpoint_accuracy, {"robustness": False}),
        (maker_predictions, None),
    ):
        run_config = {"ops": {asset.key.to_user_string(): {"config": config}}} if config is not None else None
        result = dg.materialize(
            [asset], resources=resources, instance=instance, partition_key=CLASS_KEY, run_config=run_config
        )
        assert result.success
        results[asset.key.to_user_string()] = result.asset_materializations_for_node(asset.key.to_user_string())[0]
    return home, resources, instance, results


def _write_incoming(home):
    from PIL import Image

    from car_maker_pipeline.data.maker_dataset import MakerDataset

    folder = home / "incoming"
    folder.mkdir()
    test = MakerDataset.current(PipelineStore(home)).load()["test"]
    for index in range(3):
        buffer = io.BytesIO()
        test[index]["image"].convert("RGB").save(buffer, format="JPEG")
        (folder / f"car-{index}.jpg").write_bytes(buffer.getvalue())
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")


def _dataset_classes(home) -> list[str]:
    from car_maker_pipeline.data.maker_dataset import MakerDataset

    dataset = MakerDataset.current(PipelineStore(home)).load()
    return sorted({name for split in dataset.values() for name in split["source_class"]})


def _rows(value) -> list[dict]:
    return [record.data for record in value.value.records]


slow = pytest.mark.slow  # the module fixture trains and scores the class task


@slow
def test_class_baseline_metadata_carries_class_and_implied_maker_accuracy_and_the_levels(class_chain):
    home, *_, results = class_chain
    metadata = results[BASELINE_EVALUATION].metadata
    assert results[BASELINE_EVALUATION].partition == CLASS_KEY
    manifest = PipelineStore(home).read_manifest(BASELINE_EVALUATION, "tiny-s@class")
    assert manifest["task"] == "class" and manifest["params"]["num_answers"] == len(_dataset_classes(home))
    class_accuracy = metadata["class_accuracy"].value
    assert class_accuracy == metadata["accuracy"].value  # the class task's accuracy is class accuracy
    assert class_accuracy <= metadata["implied_maker_accuracy"].value <= 1.0
    assert metadata["top1_accuracy"].value <= metadata["top5_accuracy"].value
    levels = {row["level"]: row for row in _rows(metadata["hierarchical_coverage"])}
    assert set(levels) >= LEVELS
    assert sum(levels[level]["share"] for level in LEVELS) == pytest.approx(1.0)
    # The words say what the numbers do: certified, or every answer unsure.
    certified = manifest["calibration"]["certified"]
    assert ("precision is certified" in metadata["certification"].value) == certified
    assert certified or levels["unsure"]["share"] == 1.0
    assert "confusion_matrix" not in metadata  # 196 x 196 cells: the confused pairs within a maker instead
    assert {"maker", "true_class", "predicted_class"} <= {
        c.name for c in metadata["confused_within_maker"].value.schema.columns
    }


@slow
def test_class_training_and_scoring_keep_to_their_own_folders_and_register_car_class(class_chain):
    home, *_, results = class_chain
    store = PipelineStore(home)
    training = store.read_manifest(LORA_CHECKPOINTS, "tiny-s@class")
    assert training["task"] == "class" and training["makers"] == _dataset_classes(home)
    assert not (home / LORA_CHECKPOINTS / MODEL).exists()  # the maker task's folder is untouched
    metadata = results[CHECKPOINT_ACCURACY].metadata
    assert metadata["registered_model"].value.startswith("car-class-tiny-s v")
    assert 0.0 <= metadata["best_class_accuracy"].value <= metadata["best_implied_maker_accuracy"].value <= 1.0
    assert {row["level"] for row in _rows(metadata["best_hierarchical_coverage"])} >= LEVELS
    steps = [row["step"] for row in _rows(metadata["accuracy_by_step"])]
    assert steps == [2, 4] and all("top5_accuracy" in row for row in _rows(metadata["accuracy_by_step"]))
    assert store.read_manifest(CHECKPOINT_ACCURACY, "tiny-s@class")["task"] == "class"


@slow
def test_the_class_champion_answers_with_a_level_in_batch_and_in_the_pyfunc_model(class_chain):
    import mlflow
    import pandas as pd

    from car_maker_pipeline.data.makers import makers_for_class_names
    from car_maker_pipeline.mlflow_store import default_tracking_uri

    home, *_, results = class_chain
    metadata = results["maker_predictions"].metadata
    assert metadata["model"].value.startswith("car-class-tiny-s v")
    table = pd.read_parquet(metadata["path"].value).set_index("file_name")
    read = table[table["error"].isna()]
    assert len(read) == 4 and set(read["level"]) <= LEVELS
    classes = set(PipelineStore(home).read_manifest(LORA_CHECKPOINTS, "tiny-s@class")["makers"])
    makers = set(makers_for_class_names(sorted(classes)))
    for row in read.itertuples():  # the answer is of its level's kind
        expected = {"class": classes, "maker": makers, "unsure": {"unsure"}}[row.level]
        assert row.answer in expected, row
    assert {row["level"] for row in _rows(metadata["levels"])} == set(read["level"])

    mlflow.set_tracking_uri(default_tracking_uri(home))
    model = mlflow.pyfunc.load_model("models:/car-class-tiny-s@champion")
    # The registered card carries the class task and both thresholds checkpoint_accuracy certified.
    policy = PipelineStore(home).read_manifest(CHECKPOINT_ACCURACY, "tiny-s@class")["calibration"]
    config = model.model_config
    assert config["task"] == "class"
    assert (config["confidence_threshold"], config["maker_threshold"]) == (
        policy["class_threshold"],
        policy["maker_threshold"],
    )
    blobs = [(home / "incoming" / name).read_bytes() for name in ("car-0.jpg", "car-1.jpg")]
    answered = model.predict(pd.DataFrame({"image": blobs}))
    assert list(answered.columns[:4]) == ["maker", "probability", "answer", "level"]
    assert set(answered["level"]) <= LEVELS


@slow
def test_a_class_run_is_not_scored_or_queued_as_the_maker_task(class_chain, tmp_path):
    import shutil

    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.orchestration.assets.evaluation import checkpoint_accuracy
    from car_maker_pipeline.orchestration.assets.labeling import review_queue
    from car_maker_pipeline.orchestration.resources import StoreResource
    from car_maker_pipeline.recording.baseline import RecordTarget
    from car_maker_pipeline.recording.checkpoint_accuracy import evaluate_checkpoints_and_record

    home, resources, instance, _ = class_chain
    # The class run's manifests copied where the maker task reads them: refused, naming both tasks.
    copy = tmp_path / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("mlflow*", "*.db"))
    for asset in (LORA_CHECKPOINTS, BASELINE_EVALUATION):
        shutil.copytree(copy / asset / "tiny-s@class", copy / asset / MODEL, dirs_exist_ok=True)
    store = PipelineStore(copy)
    assert MakerDataset.current(store).makers
    with pytest.raises(TaskError, match="'class' task but the 'maker' task"):
        evaluate_checkpoints_and_record(
            store,
            RecordTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", "run"),
            lambda: pytest.fail("no model may load for a mismatched task"),
            model_key=MODEL,
            batch_size=4,
        )
    result = dg.materialize(
        [review_queue],
        resources={**resources, "store": StoreResource(home=str(home))},
        instance=instance,
        partition_key=CLASS_KEY,
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "tiny-s|maker" in failure.step_failure_data.error.to_string()
    assert checkpoint_accuracy.partitions_def == model_partitions


@slow
def test_classify_prints_the_class_models_levels_and_the_true_class(class_chain, monkeypatch, capsys):
    from car_maker_pipeline.classify import main
    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.mlflow_store import default_tracking_uri

    home, *_ = class_chain
    monkeypatch.setenv("CAR_MAKER_HOME", str(home))
    command = ["--model", "car-class-tiny-s", "--from-test", "3", "--tracking-uri", default_tracking_uri(home)]
    assert main(command) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    test = MakerDataset.current(PipelineStore(home)).load()["test"]
    assert [line[-1] for line in lines] == [f"true: {name}" for name in test.select(range(3))["source_class"]]
    classes = set(_dataset_classes(home))
    for line in lines:  # the answer and what follows it say the level (classify.answer_text)
        if line[1] == "unsure" or line[2] == "maker level":
            assert line[-2].startswith("(") and line[-2].split(" 0.")[0].lstrip("(") in classes
        else:
            assert line[1] in classes and line[3] == "class level"
