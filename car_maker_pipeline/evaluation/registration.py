"""The registered car-maker classifier: its name, its card, registering a version and finding versions again.

`checkpoint_accuracy` registers the best checkpoint's adapter here and `classify` reads it back, so
the conventions both sides depend on (the model name, the artifact folder, the card file and its
fields) are written once, in this module.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from car_maker_pipeline.storage import write_json_atomic

REGISTERED_MODEL_PREFIX = "car-maker-"
BEST_ADAPTER = "best_adapter"  # the artifact folder of the MLflow run that a registered version points at
CARD_FILE = "car_maker.json"  # what `classify` needs besides the adapter: the maker list and the base model
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def registered_model_name(model_key: str) -> str:
    return f"{REGISTERED_MODEL_PREFIX}{model_key}"


def write_card(path: Path, makers: list[str], base_model: str, base_model_revision: str, step: int) -> Path:
    write_json_atomic(
        path,
        {"makers": makers, "base_model": base_model, "base_model_revision": base_model_revision, "step": step},
    )
    return path


def log_best_adapter(checkpoint: Path, card: Path) -> str:
    """Log the adapter files and the card into the active run's `best_adapter` folder; returns its URI."""
    for path in (*(checkpoint / name for name in ADAPTER_FILES), card):
        mlflow.log_artifact(str(path), artifact_path=BEST_ADAPTER)
    return mlflow.get_artifact_uri(BEST_ADAPTER)


def register_adapter(uri: str, run_id: str, artifact_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register a logged adapter folder as a new version of `name`; returns the version number."""
    client = MlflowClient(uri)
    try:
        client.create_registered_model(
            name, description="LoRA adapter for car-maker classification; base model in the version tags."
        )
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code if hasattr(error, "error_code") else error):
            raise
    version = client.create_model_version(
        name, source=artifact_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
    )
    return str(version.version)


def registered_versions(uri: str, name: str | None = None) -> list:
    """The versions of `name`, or of every car-maker model when no name is given."""
    query = f"name = '{name}'" if name else f"name LIKE '{REGISTERED_MODEL_PREFIX}%'"
    return list(MlflowClient(uri).search_model_versions(query))
