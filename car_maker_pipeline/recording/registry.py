"""The chosen checkpoint as a registered MLflow model: logged as a pyfunc, versioned, bound to its files.

`register_classifier` runs inside the checkpoint evaluation's MLflow run. It logs the adapter as a
models-from-code pyfunc model (`pyfunc_model.py`) with a signature, an input example, pinned pip
requirements and this package as code, and registers it as a new version of `car-maker-<model>`
with the tags the registry has always carried and the size and sha256 of every file of the logged
model (`artifact_files`, checked whenever the model is loaded: `serving/integrity.py`); it records
which data the run saw (`log_dataset_inputs`). Once that run has ended, `aliases.promote` moves
`@challenger` and `@champion`.

`classify`, the scoring server and the batch predictions load `models:/car-maker-<model>@champion`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from car_maker_pipeline.data.tasks import MAKER, Task, get_task
from car_maker_pipeline.models.checkpoint_marker import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from car_maker_pipeline.serving.predictor import (
    ADAPTER_ARTIFACT,
    IMAGE_COLUMN,
    MAKERS_ARTIFACT,
    OUTPUT_SCHEMA,
    ClassifierCard,
)

CHAMPION, CHALLENGER = "champion", "challenger"  # the validation-best version, the newest (aliases.py)
# Logged as the model's code: the whole package, and the models-from-code file that MLflow runs to load it.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_MODEL_FILE = PACKAGE_DIR / "serving" / "pyfunc_model.py"
LOGGED_MODEL_NAME = "classifier"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
# What the served model imports, pinned to the versions this environment runs (local labels such as
# +cu130 dropped: the same release installs from the index for CPU or GPU).
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "peft",
    "safetensors",
    "pillow",
    "pandas",
    "numpy",
    "datasets",
)
# Overridable at load time (only keys saved with the model can be overridden).
RUNTIME_CONFIG = {"device": "auto", "dtype": "auto", "batch_size": 16}


def registered_name(model_key: str, task: Task = MAKER) -> str:
    """One registered model per base model and task: `car-maker-<model>` (the maker task, named as before the
    class task existed, so registries need no migration) and `car-class-<model>`."""
    return f"car-{task.name}-{model_key}"


REGISTERED_MODEL_PREFIX = registered_name("")  # + the model key: the maker task's model of each base model


def registered_versions(uri: str, name: str | None = None) -> list:
    """The versions of `name`, or of every car-maker model when no name is given."""
    from mlflow import MlflowClient

    query = f"name = '{name}'" if name else f"name LIKE '{REGISTERED_MODEL_PREFIX}%'"
    return list(MlflowClient(uri).search_model_versions(query))


def model_uri(model_key: str, alias: str = CHAMPION, task: Task = MAKER) -> str:
    return f"models:/{registered_name(model_key, task)}@{alias}"


def maker_list_hash(makers: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(makers)).encode()).hexdigest()[:12]


def pinned_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_DISTRIBUTIONS]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUT_SCHEMA]),
    )


@dataclass(frozen=True)
class Candidate:
    """The checkpoint chosen on validation, as it is registered."""

    model_key: str
    adapter_dir: Path
    card: ClassifierCard
    val_accuracy: float
    test_accuracy: float

    @classmethod
    def of_checkpoint(
        cls,
        model_key: str,
        checkpoint: Path,
        loaded,
        makers: list[str],
        prompt,
        *,
        step: int,
        val_accuracy,
        test_accuracy,
        **answer_policy,
    ) -> Candidate:
        """The candidate for a checkpoint scored with `loaded` (models.loading.LoadedModel) and `prompt`;
        `answer_policy`: the card's temperature, threshold and certificate (`CalibrationReport.card_fields()`)."""
        from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget

        card = ClassifierCard.for_base_model(
            loaded.path_or_id,
            loaded.revision,
            list(makers),
            system_prompt=prompt.system,
            user_prompt=prompt.user,
            image_token_budget=ImageTokenBudget.of(loaded.processor).to_json(),
            step=int(step),
            **answer_policy,
        )
        return cls(model_key, Path(checkpoint), card, float(val_accuracy), float(test_accuracy))


def _stage_artifacts(candidate: Candidate, folder: Path) -> dict[str, str]:
    adapter = folder / ADAPTER_ARTIFACT
    adapter.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(candidate.adapter_dir / name, adapter / name)
    candidate.card.write(adapter)  # so the downloaded folder also works with `classify --adapter`
    makers = folder / "makers.json"
    makers.write_text(json.dumps(candidate.card.makers))
    return {ADAPTER_ARTIFACT: str(adapter), MAKERS_ARTIFACT: str(makers)}


def _input_example(dataset_record):
    import pandas as pd

    from car_maker_pipeline.serving.images import encode_png

    validation = dataset_record.load()["validation"]
    return pd.DataFrame({IMAGE_COLUMN: [encode_png(validation[0]["image"])]})


def pyfunc_arguments(candidate: Candidate, staging: Path, dataset_record) -> dict:
    """What `mlflow.pyfunc.log_model` (or `save_model`) is given for a candidate; artifacts staged in `staging`."""
    return {
        "python_model": str(PYFUNC_MODEL_FILE),
        "artifacts": _stage_artifacts(candidate, staging),
        "model_config": {**candidate.card.model_config(), **RUNTIME_CONFIG},
        "code_paths": [str(PACKAGE_DIR)],
        "signature": signature(),
        "input_example": _input_example(dataset_record),
        "pip_requirements": pinned_requirements(),
    }


@dataclass(frozen=True)
class RegisteredVersion:
    """A version just registered, before its aliases move (`aliases.promote`)."""

    name: str
    version: str
    run_id: str  # the MLflow run that registered it
    val_accuracy: float
    maker_list_hash: str


def register_classifier(
    candidate: Candidate, *, uri: str, home: Path, dataset_record, tags: dict[str, str]
) -> RegisteredVersion:
    """Log and register the candidate inside the active MLflow run; see the module docstring.

    `tags` are the version's tags beyond those derived from the candidate (the Dagster run id).
    """
    import mlflow

    from car_maker_pipeline.recording.lineage import additions_note, log_dataset_inputs
    from car_maker_pipeline.serving.integrity import ARTIFACT_FILES_TAG, artifact_record
    from car_maker_pipeline.tracking import registry_lock

    name = registered_name(candidate.model_key, get_task(candidate.card.task))
    makers_hash = maker_list_hash(candidate.card.makers)
    log_dataset_inputs(dataset_record)
    with tempfile.TemporaryDirectory(prefix="car-maker-pyfunc-") as staging:
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME, **pyfunc_arguments(candidate, Path(staging), dataset_record)
        )
    with tempfile.TemporaryDirectory(prefix="car-maker-logged-") as copy:
        # The files as the artifact store holds them (a local store is read in place, a remote one downloaded).
        logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=copy))
        files = artifact_record(logged)
    version_tags = {
        "base_model_id": candidate.card.base_model,
        "base_model_revision": candidate.card.base_model_revision,
        "step": str(candidate.card.step),
        "val_accuracy": f"{candidate.val_accuracy:.4f}",
        "test_accuracy": f"{candidate.test_accuracy:.4f}",
        **{key: str(value) for key, value in tags.items()},
        "val_accuracy_exact": repr(float(candidate.val_accuracy)),
        "maker_list_hash": makers_hash,
        "num_makers": str(len(candidate.card.makers)),
        ARTIFACT_FILES_TAG: files,
    }
    with registry_lock(uri, home, name):
        registered = mlflow.register_model(info.model_uri, name, tags=version_tags)
    version = str(registered.version)
    if additions_note(dataset_record):  # the labeled batches this version learned from
        mlflow.MlflowClient(uri).update_model_version(name, version, description=additions_note(dataset_record))
    mlflow.MlflowClient(uri).update_registered_model(
        name,
        description=(
            "Car-maker classifier: a LoRA-tuned vision-language model as an MLflow pyfunc model (one image per "
            "row as bytes in column `image`; returns the maker, its calibrated probability, the answer (`unsure` below "
            "the confidence threshold certified on validation) and the next two makers). @champion is the validation-best "
            "version, @challenger the newest; base model and accuracies are in the version tags."
        ),
    )
    mlflow.set_tag("registered_model", f"{name}/{version}")
    return RegisteredVersion(name, version, mlflow.active_run().info.run_id, float(candidate.val_accuracy), makers_hash)


class NoChampionError(LookupError):
    """A registered model without a champion version (or no registered model at all)."""


def champion_version(uri: str, model_key: str, task: Task = MAKER):
    """The MLflow ModelVersion that `car-<task>-<model_key>@champion` names now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = registered_name(model_key, task)
    try:
        return MlflowClient(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        raise NoChampionError(
            f"{name} has no @{CHAMPION} version in {uri}. Materialize checkpoint_accuracy for {model_key} first "
            f"(it registers the checkpoint chosen on validation), e.g. `dagster asset materialize -m car_maker_pipeline "
            f"--select lora_checkpoints,checkpoint_accuracy --partition '{model_key}|{task.name}'`."
        ) from error


def check_version_makers(version, makers: list[str]) -> None:
    """Refuse, before any model loads, to score a registered version on a dataset of other makers."""
    registered = version.tags.get("maker_list_hash")
    if registered is not None and registered != maker_list_hash(makers):
        raise ValueError(
            f"{version.name} v{version.version} classifies into {version.tags.get('num_makers', '?')} makers that are "
            f"not car_maker_dataset's {len(makers)} (maker list hash {registered} vs {maker_list_hash(makers)}). "
            "Train and register a model on this dataset (lora_checkpoints, then checkpoint_accuracy) first."
        )


def load_version(uri: str, name: str, version: str, **runtime):
    """The pyfunc model of one registered version (pinned by number, so a moving alias cannot change it midway).

    `runtime`: overrides of RUNTIME_CONFIG (device, dtype, batch_size).
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}", model_config=runtime or None)
