"""Registered versions bound to their files, registrations from two Dagster instances at once, and a home
whose name looks like a URI. Slow: one module fixture trains and registers tiny-s in a home named
`runs?stage=1` (as `make demo` would, with fewer steps).

A registered version's files changed in the artifact store after registration, then loaded:

| change                                              | refusal names                                  |
|-----------------------------------------------------|------------------------------------------------|
| maker list edited (BMW -> Tesla)                    | artifacts/makers.json                          |
| adapter bytes flipped (same size)                   | artifacts/adapter/adapter_model.safetensors    |
| threshold set to 0, temperature to 0.05 (model config) | MLmodel                                     |
| the adapter's card edited                           | artifacts/adapter/car_maker.json               |
| a file added beside the adapter                     | artifacts/adapter/extra.safetensors            |
| the adapter config deleted                          | artifacts/adapter/adapter_config.json          |
| the model's copy of the code edited                 | code/car_maker_pipeline/serving/predictor.py   |

by every door: `load_version` (the pyfunc, as `merged_model` and `maker_predictions` load it) for each
change; for the maker list also `classify`, `mlflow models serve` (it does not start) and the
`merged_model` and `maker_predictions` assets (they fail naming the file). Restored, the version loads
again. A version registered before the hashes existed (no `artifact_files` tag) loads with a warning.

Two `dagster asset materialize` of checkpoint_accuracy at once, from two Dagster instances with their
own homes and one MLflow store: both succeed, both register, no MLflow run is deleted, and both
aliases name versions of finished runs (@challenger the newest). Last: nothing was created beside the
home from a percent-encoded URI (no `runs%3Fstage=1`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import yaml
from mlflow.entities import ViewType

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.store import PipelineStore
from car_maker_pipeline_tests.support.cli import REPO, cli_env, materialize_command
from car_maker_pipeline_tests.support.hostile_images import encoded
from car_maker_pipeline_tests.support.serving import (
    MODEL,
    PARTITION,
    ScoringServer,
    command_env,
    registered_classifier,
    tracking_uri,
)

pytestmark = pytest.mark.slow

NAME = f"car-maker-{MODEL}"
HOME_NAME = "runs?stage=1"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    home = root / HOME_NAME
    resources, instance = registered_classifier(home)
    return root, home, resources, instance


def _spare_version(home: Path) -> str:
    """A new version of the champion's adapter, never given an alias: one to tamper with."""
    from car_maker_pipeline.recording.registry import Candidate, register_classifier
    from car_maker_pipeline.serving.predictor import ClassifierCard
    from car_maker_pipeline.tracking import mlflow_run

    uri = tracking_uri(home)
    adapter = _files(home, "1") / "artifacts" / "adapter"
    with mlflow_run(uri, home, "spare", {"stage": "integrity-test"}):
        registered = register_classifier(
            Candidate(MODEL, adapter, ClassifierCard.read(adapter), 0.1, 0.1),
            uri=uri,
            home=home,
            dataset_record=MakerDataset.current(PipelineStore(home)),
            tags={"dagster_run_id": "integrity-test"},
        )
    return registered.version


def _files(home: Path, version: str) -> Path:
    """The version's folder in the artifact store itself (a local store is read in place)."""
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{version}", tracking_uri=tracking_uri(home))
    )


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _config(path: Path) -> None:
    mlmodel = yaml.safe_load(path.read_text())
    mlmodel["flavors"]["python_function"]["config"].update(confidence_threshold=0.0, temperature=0.05)
    path.write_text(yaml.safe_dump(mlmodel))


TAMPERING = {
    "makers": ("artifacts/makers.json", lambda p: p.write_text(p.read_text().replace("BMW", "Tesla"))),
    "adapter": ("artifacts/adapter/adapter_model.safetensors", _flip),
    "config": ("MLmodel", _config),
    "card": ("artifacts/adapter/car_maker.json", lambda p: p.write_text(p.read_text().replace("BMW", "Tesla"))),
    "added": ("artifacts/adapter/extra.safetensors", lambda p: p.write_bytes(b"\0" * 64)),
    "deleted": ("artifacts/adapter/adapter_config.json", lambda p: p.unlink()),
    "code": ("code/car_maker_pipeline/serving/predictor.py", lambda p: p.write_text(p.read_text() + "\n# edited\n")),
}


class Tampered:
    """One file of a version changed for the block, then put back exactly as it was."""

    def __init__(self, folder: Path, relative: str, change):
        self.path, self.change = folder / relative, change
        self.saved = self.path.read_bytes() if self.path.exists() else None

    def __enter__(self):
        self.change(self.path)

    def __exit__(self, *exc):
        if self.saved is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_bytes(self.saved)


def test_a_version_changed_after_registration_is_refused_naming_the_file(registered):
    from car_maker_pipeline.recording.registry import load_version

    _, home, _, _ = registered
    version = _spare_version(home)
    folder = _files(home, version)
    for kind, (relative, change) in TAMPERING.items():
        with Tampered(folder, relative, change), pytest.raises(mlflow.exceptions.MlflowException) as refused:
            load_version(tracking_uri(home), NAME, version)
        message = refused.value.message
        assert f"{NAME} v{version} was changed after it was registered" in message and relative in message, kind
    model = load_version(tracking_uri(home), NAME, version)  # every file restored: it loads
    assert model.unwrap_python_model().registered_as == f"{NAME} v{version}"


def test_every_door_refuses_the_champion_with_an_edited_maker_list(registered, tmp_path):
    from car_maker_pipeline.orchestration.assets.serving import maker_predictions, merged_model

    _, home, resources, instance = registered
    relative, change = TAMPERING["makers"]
    (home / "incoming").mkdir(exist_ok=True)
    (home / "incoming" / "car.jpg").write_bytes(encoded())
    env = command_env(home)
    with Tampered(_files(home, "1"), relative, change):
        for asset in (merged_model, maker_predictions):
            result = dg.materialize(
                [asset], resources=resources, instance=instance, partition_key=PARTITION, raise_on_error=False
            )
            failure = result.get_step_failure_events()[0].step_failure_data.error
            assert not result.success and relative in str(failure.to_string()), asset.key
        cli = subprocess.run(
            [sys.executable, "-m", "car_maker_pipeline.classify", str(home / "incoming" / "car.jpg")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert cli.returncode == 2 and relative in cli.stderr and "Traceback" not in cli.stderr, cli.stderr[-2000:]
        with pytest.raises(RuntimeError, match="exited") as server:
            ScoringServer(f"models:/{NAME}@champion", env, tmp_path / "serve.log").start()
        assert relative in str(server.value)


def test_a_version_registered_before_the_hashes_loads_with_a_warning(registered, caplog):
    from car_maker_pipeline.recording.registry import load_version
    from car_maker_pipeline.serving.integrity import ARTIFACT_FILES_TAG

    _, home, _, _ = registered
    version = _spare_version(home)
    mlflow.MlflowClient(tracking_uri(home)).delete_model_version_tag(NAME, version, ARTIFACT_FILES_TAG)
    with caplog.at_level("WARNING"):
        load_version(tracking_uri(home), NAME, version)
    assert "registered before its files' hashes were recorded" in caplog.text


def test_two_instances_registering_at_once_both_register_and_aliases_name_finished_runs(registered, tmp_path):
    root, home, _, _ = registered
    second_home = tmp_path / "second home"  # its own pipeline store, the same MLflow store
    shutil.copytree(home, second_home, ignore=shutil.ignore_patterns("mlflow.db*", "mlflow-artifacts", ".registry-*"))
    client = mlflow.MlflowClient(tracking_uri(home))
    before = {str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")}
    config = {"ops": {"checkpoint_accuracy": {"config": {"robustness": False}}}}
    processes = []
    for index, pipeline_home in enumerate((home, second_home)):
        env = {**cli_env(tmp_path / f"instance-{index}"), "MLFLOW_TRACKING_URI": tracking_uri(home)}
        env["CAR_MAKER_HOME"] = str(pipeline_home)
        command = materialize_command("checkpoint_accuracy", PARTITION, config)
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [process.communicate(timeout=1200)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0 and "RUN_SUCCESS" in output, output[-4000:]
        assert "must be in the 'active' state" not in output

    experiment = client.get_experiment_by_name("car_maker_pipeline").experiment_id
    runs = client.search_runs([experiment], "tags.stage = 'checkpoint_accuracy'", run_view_type=ViewType.ALL)
    assert runs and all(r.info.lifecycle_stage == "active" and r.info.status == "FINISHED" for r in runs)
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{NAME}'")}
    assert len(set(versions) - before) == 2  # both registered
    finished = {r.info.run_id for r in runs} | {
        r.info.run_id for r in client.search_runs([experiment], "attributes.status = 'FINISHED'")
    }
    for alias in ("champion", "challenger"):
        assert client.get_model_version_by_alias(NAME, alias).run_id in finished, alias
    assert int(client.get_model_version_by_alias(NAME, "challenger").version) == max(map(int, versions))


def test_nothing_is_created_beside_the_home_from_its_uri(registered):
    """Last: after training, registering, loading and serving from a home named `runs?stage=1`."""
    root, home, _, _ = registered
    assert sorted(path.name for path in root.iterdir()) == [HOME_NAME]
    assert (home / "mlflow.db").is_file() and list((home / "mlflow-artifacts").iterdir())
    assert not [path for path in home.rglob("*") if "%3F" in path.name or "%2F" in path.name]
