"""The README's command-line recipes, run as a new user would: real `dagster` processes, demo profile.

Slow: each `dagster asset materialize` starts fresh processes. One module-scoped home is shared so
the stages build on each other like a person's session does.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from car_maker_pipeline_tests.support.cli import DAGSTER, REPO, cli_env, cli_instance
from car_maker_pipeline_tests.support.cli import materialize as run_materialize
from car_maker_pipeline_tests.support.pipeline import demo_split_rows

pytestmark = pytest.mark.slow

SMALL_SOURCE = {
    "resources": {
        "source": {"config": {"demo_train_per_maker": 10, "demo_test_per_maker": 4, "demo_corruptions": ["contrast"]}}
    }
}
# A recognisable Hugging Face token in the environment of every command: it must end up nowhere.
FAKE_HF_TOKEN = "hf_FAKEcliTOKENthatMUSTneverBEstored987654"
OUTPUTS: list[str] = []  # stdout + stderr of every command run here, searched for the token at the end
SHORT_TRAINING = {"max_steps": 24, "checkpoint_every_n_steps": 4, "per_device_train_batch_size": 4}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cli"), HF_TOKEN=FAKE_HF_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_HF_TOKEN)


def materialize(env, select, partition=None, config=None, timeout=900):
    return run_materialize(env, select, partition, config, timeout, outputs=OUTPUTS)


def _plain(value):
    """A metadata value as JSON would carry it: a typed table as its rows (dicts), anything else as its value."""
    inner = getattr(value, "value", None)
    return [record.data for record in inner.records] if hasattr(inner, "records") else inner


def latest_metadata(env, asset, partition=None) -> dict:
    """The metadata of `asset`'s (or `partition`'s) latest materialization, read from the commands' own
    DAGSTER_HOME here rather than in one more process."""
    key = dg.AssetKey(asset)
    with cli_instance(env) as instance:
        if partition:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
            ).records
            metadata = records[0].asset_materialization.metadata
        else:
            metadata = instance.get_latest_materialization_event(key).asset_materialization.metadata
    return json.loads(json.dumps({name: _plain(value) for name, value in metadata.items()}, default=str))


def test_definitions_validate(env):
    result = subprocess.run(
        [DAGSTER, "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_data_assets_from_the_cli(env):
    materialize(env, "raw_stanford_cars,car_maker_dataset", config=SMALL_SOURCE)
    metadata = latest_metadata(env, "car_maker_dataset")
    assert {"Aston Martin", "Land Rover", "AM General"} <= set(metadata["makers"])
    assert metadata["num_makers"] == 6 and metadata["dropped_count"] == 0
    test_rows = demo_split_rows(SMALL_SOURCE["resources"]["source"]["config"]["demo_test_per_maker"])
    assert metadata["rows_test"] == test_rows and metadata["rows_contrast"] == test_rows


@pytest.mark.parametrize("partition", ["tiny-s|maker", "tiny-m|maker", "tiny-l|maker"])
def test_baseline_partition_from_the_cli(env, partition):
    materialize(env, "baseline_evaluation", partition=partition)
    metadata = latest_metadata(env, "baseline_evaluation", partition)
    assert metadata["num_images"] == demo_split_rows(
        SMALL_SOURCE["resources"]["source"]["config"]["demo_test_per_maker"]
    )
    assert 0.0 <= metadata["accuracy_ci_low"] <= metadata["accuracy"] <= metadata["accuracy_ci_high"] <= 1.0
    assert metadata["images_per_second"] > 0


def _complete_checkpoints(home: Path) -> list[int]:
    return sorted(
        int(p.parent.name.split("-")[1])
        for p in home.glob("lora_checkpoints/tiny-s/*/checkpoint-*/checkpoint_complete.json")
    )


def test_training_killed_with_sigkill_resumes_in_the_same_mlflow_run(env):
    home = Path(env["CAR_MAKER_HOME"])
    config = {"ops": {"lora_checkpoints": {"config": SHORT_TRAINING}}}
    command = [
        DAGSTER,
        "asset",
        "materialize",
        "-m",
        "car_maker_pipeline",
        "--select",
        "lora_checkpoints",
        "--partition",
        "tiny-s|maker",
        "--config-json",
        json.dumps(config),
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not _complete_checkpoints(home) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its step process, mid-training
    process.wait()
    killed_at = _complete_checkpoints(home)
    assert killed_at and max(killed_at) < SHORT_TRAINING["max_steps"], f"not killed mid-run: {killed_at}"

    materialize(env, "lora_checkpoints", partition="tiny-s|maker", config=config)
    metadata = latest_metadata(env, "lora_checkpoints", "tiny-s|maker")
    assert metadata["global_step"] == SHORT_TRAINING["max_steps"]
    assert metadata["resumed_from"].endswith(f"checkpoint-{max(killed_at)}") or max(killed_at) < 4
    assert _complete_checkpoints(home) == list(range(4, SHORT_TRAINING["max_steps"] + 1, 4))

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("car_maker_pipeline")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.stage = 'training' and tags.model_key = 'tiny-s'"
    )
    assert len(runs) == 1, "the resumed training opened a second MLflow run"
    assert runs[0].info.run_id == metadata["mlflow_run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert max(m.step for m in history) > max(killed_at)  # the resumed half logged into the same run
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")} == set(range(4, 25, 4))


def test_checkpoint_accuracy_registers_a_model_and_classify_uses_it(env):
    materialize(env, "checkpoint_accuracy", partition="tiny-s|maker")
    metadata = latest_metadata(env, "checkpoint_accuracy", "tiny-s|maker")
    assert metadata["best_step"] in range(4, 25, 4)
    assert [row["step"] for row in metadata["accuracy_by_step"]] == list(range(4, 25, 4))
    assert [row["corruption"] for row in metadata["accuracy_by_corruption"]] == ["contrast"]
    assert metadata["registered_model"].startswith("car-maker-tiny-s v")

    home = Path(env["CAR_MAKER_HOME"])
    import datasets

    makers = datasets.load_from_disk(json.loads((home / "car_maker_dataset" / "current.json").read_text())["path"])
    image_path = home / "test_image.png"
    makers["test"][0]["image"].save(image_path)
    (home / "broken.jpg").write_bytes(b"not a jpeg")
    result = subprocess.run(
        [sys.executable, "-m", "car_maker_pipeline.classify", str(image_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    OUTPUTS.append(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    path, answer, score = result.stdout.strip().split("\t")
    names = makers["test"].features["maker_id"].names
    if answer == "unsure":  # below the registered threshold: the three most probable makers, with theirs
        top = [part.rsplit(" ", 1) for part in score.strip("()").split(", ")]
        shown = [float(p) for _, p in top]  # printed to 3 decimals: a runner-up may show as 0.000
        assert len(top) == 3 and all(maker in names for maker, _ in top)
        assert 0 < shown[0] <= 1 and shown == sorted(shown, reverse=True) and min(shown) >= 0
    else:
        assert answer in names and 0 < float(score) <= 1
    assert path == str(image_path)

    from_test = subprocess.run(
        [sys.executable, "-m", "car_maker_pipeline.classify", "--from-test", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    OUTPUTS.append(from_test.stdout + from_test.stderr)
    assert from_test.returncode == 0, from_test.stderr[-3000:]
    lines = [line.split("\t") for line in from_test.stdout.strip().splitlines()]
    truth = [makers["test"].features["maker_id"].names[makers["test"][i]["maker_id"]] for i in range(3)]
    assert [line[0] for line in lines] == ["test[0]", "test[1]", "test[2]"]
    assert [line[3] for line in lines] == [f"true: {maker}" for maker in truth]

    broken = subprocess.run(
        [sys.executable, "-m", "car_maker_pipeline.classify", str(home / "broken.jpg")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert broken.returncode == 2 and "broken.jpg" in broken.stderr and "not a readable image" in broken.stderr


def test_the_hugging_face_token_is_stored_nowhere(env):
    """After every stage ran with HF_TOKEN set: not in MLflow (params, tags, artifacts, pickled training
    arguments), not in the Dagster event log or compute logs, not in checkpoints, not in any output."""
    roots = [Path(env["CAR_MAKER_HOME"]), Path(env["DAGSTER_HOME"])]
    files = [path for root in roots for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files) and any(
        path.suffix == ".db" and "runs" in path.name for path in files
    )
    assert any(path.name == "training_args.bin" for path in files)  # the pickle the Trainer writes is searched too
    needle = FAKE_HF_TOKEN.encode()
    leaks = [str(path) for path in files if needle in path.read_bytes()]
    assert leaks == [], f"the token was written to {leaks}"
    assert OUTPUTS and not any(FAKE_HF_TOKEN in output for output in OUTPUTS)
