"""`lora_checkpoints` with `num_processes: 2`: `accelerate launch` starts two CPU processes (gloo),
Dagster Pipes carries rank 0's logs and result back, and the outcome is the same kind of thing as a
one-process run: the same checkpoints, adapter tensors of the same names and shapes, one MLflow run
with the same curves and parameters.
"""

import dagster as dg
import mlflow
import pytest
from safetensors import safe_open

from car_maker_pipeline.orchestration.assets.training import lora_checkpoints
from car_maker_pipeline_tests.support.pipeline import materialized_demo_data

pytestmark = pytest.mark.slow

TRAINING = {"max_steps": 8, "checkpoint_every_n_steps": 4, "per_device_train_batch_size": 4}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("distributed")
    resources, instance, _ = materialized_demo_data(home, train_per_maker=10, test_per_maker=3, corruptions=[])
    return home, resources, instance


def _train(pipeline, num_processes: int) -> dict:
    _, resources, instance = pipeline
    result = dg.materialize(
        [lora_checkpoints],
        resources=resources,
        instance=instance,
        partition_key="tiny-s|maker",
        run_config={"ops": {"lora_checkpoints": {"config": {**TRAINING, "num_processes": num_processes}}}},
    )
    assert result.success
    return {
        key: value.value
        for key, value in result.asset_materializations_for_node("lora_checkpoints")[0].metadata.items()
    }


def _adapter_shapes(path) -> dict:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as tensors:
        # safe_open is not iterable: .keys() is its API, not a dict habit (ruff SIM118 would break this)
        return {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}  # noqa: SIM118


def test_two_process_training_produces_what_one_process_does(pipeline):
    import json

    home = pipeline[0]
    single, double = _train(pipeline, 1), _train(pipeline, 2)
    assert single["training_processes"] == 1 and double["training_processes"] == 2
    assert single["global_step"] == double["global_step"] == 8
    assert single["checkpoints"] == double["checkpoints"] == [4, 8]
    assert single["adapted_layers"] == double["adapted_layers"]

    by_run = {
        json.loads(marker.read_text())["run_id"]: marker.parent
        for marker in home.glob("lora_checkpoints/tiny-s/*/mlflow_run.json")
    }
    folders = {"single": by_run[single["mlflow_run_id"]], "double": by_run[double["mlflow_run_id"]]}
    assert folders["single"] != folders["double"]  # another config (num_processes) trains into its own folder
    for step in (4, 8):
        one, two = folders["single"] / f"checkpoint-{step}", folders["double"] / f"checkpoint-{step}"
        files_one, files_two = {p.name for p in one.iterdir()}, {p.name for p in two.iterdir()}
        # Every process keeps its own RNG state, so a resumed run replays each rank's randomness.
        assert "rng_state.pth" in files_one and {"rng_state_0.pth", "rng_state_1.pth"} <= files_two
        assert files_one - {"rng_state.pth", "training_args.bin"} == files_two - {
            "rng_state_0.pth",
            "rng_state_1.pth",
            "training_args.bin",
        }
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            "checkpoint_complete.json",
            "optimizer.pt",
        } <= files_two
        assert _adapter_shapes(one) == _adapter_shapes(two)

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("car_maker_pipeline")
    runs = {
        run.info.run_id: run
        for run in client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'training'")
    }
    assert set(runs) == {single["mlflow_run_id"], double["mlflow_run_id"]}
    for run_id in runs:
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [4, 8]
        assert client.get_metric_history(run_id, "train_loss")
    assert set(runs[single["mlflow_run_id"]].data.params) == set(runs[double["mlflow_run_id"]].data.params)
    assert runs[double["mlflow_run_id"]].data.params["num_processes"] == "2"
