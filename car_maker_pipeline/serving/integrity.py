"""A registered version bound to its files: their hashes recorded on the version, verified at every load.

The registry's record of a version (its tags, in the tracking store) and the version's files (in the
artifact store) live apart, and whoever can write the artifact store could change what a version
answers without the registry knowing: the maker list edited, the adapter's bytes flipped, the
temperature or the threshold in its model config changed. So registration records the size and
sha256 of every file of the logged model (the MLmodel with its model config, the artifacts, the
code, the environment files) in the version tag `artifact_files`, and the pyfunc model checks them
whenever it is loaded: `mlflow.pyfunc.load_model`, `mlflow models serve`, `classify`,
`merged_model` and `maker_predictions`. A file changed, missing or added is a refusal naming it.

Which version a loaded folder is: MLflow writes `registered_model_meta` (name and version) into a
model it downloads through a `models:/<name>/<version>` or `@alias` URI; otherwise the versions
registered from the folder's run and logged model are looked up. A folder that no registered
version names (a model being logged, or loaded by path or `runs:/` before it was registered) is not
verified; a version registered before these hashes existed loads with a warning.

As with checkpoint markers, the hashes are not a signature: whoever can rewrite the tracking store
can rewrite the tag. They catch edits to, and corruption of, the artifact store.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from car_maker_pipeline.models.checkpoint_marker import file_records, record_problems

logger = logging.getLogger(__name__)

ARTIFACT_FILES_TAG = "artifact_files"  # on the model version: {"format": 1, "files": {path: {size, sha256}}}
RECORD_FORMAT = 1
# What MLflow itself writes into a model folder after registration: the name and version of a
# download through the registry, and Python's bytecode caches beside the model's code.
MLFLOW_WRITTEN = "registered_model_meta"


class ModelIntegrityError(RuntimeError):
    """A registered version whose files are not the ones it was registered with; the message names them."""


def model_files(root: Path) -> list[str]:
    """The files of a logged model that registration binds (all but MLflow's own later additions)."""
    return [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.relative_to(root).parts[0] != MLFLOW_WRITTEN
        and not any(part == "__pycache__" or part.startswith(".") for part in path.relative_to(root).parts)
    ]


def artifact_record(root: Path) -> str:
    """The `artifact_files` tag value for the logged model in `root`."""
    return json.dumps({"format": RECORD_FORMAT, "files": file_records(root, model_files(root))}, sort_keys=True)


def record_mismatches(root: Path, record: str) -> list[str]:
    """What differs between the files in `root` and an `artifact_files` tag value, naming each file."""
    try:
        files = json.loads(record)["files"]
        if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
            raise TypeError("files is not a mapping of records")
    except (ValueError, KeyError, TypeError) as error:
        return [f"the version's {ARTIFACT_FILES_TAG} tag is unreadable ({type(error).__name__}: {error})"]
    return record_problems(
        root, files, model_files(root), written="registered", subject="the version", record="the version's record"
    )


def _registered_meta(root: Path) -> tuple[str, str] | None:
    import yaml

    try:
        meta = yaml.safe_load((root / MLFLOW_WRITTEN).read_text())
        return str(meta["model_name"]), str(meta["model_version"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _versions_of(root: Path) -> list:
    """The registered versions made from the logged model in `root` (by its MLmodel's run and model id)."""
    import mlflow
    import yaml
    from mlflow import MlflowClient

    try:
        mlmodel = yaml.safe_load((root / "MLmodel").read_text())
        run_id, model_id = mlmodel.get("run_id"), mlmodel.get("model_id")
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    if not re.fullmatch(r"[0-9a-f]{32}", str(run_id)) or not mlflow.is_tracking_uri_set():
        return []  # not a run id to search by; or no store to ask (MLflow's default would create one here)
    versions = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    return [v for v in versions if not model_id or v.source == f"models:/{model_id}"]


def verify_registered_files(root: Path) -> str | None:
    """Check the model folder `root` against the version it was registered as; returns `<name> v<version>`,
    or None when no registered version names it. ModelIntegrityError when a file differs."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    meta = _registered_meta(root)
    if meta is not None:
        if not mlflow.is_tracking_uri_set():
            raise ModelIntegrityError(
                f"{root} is {meta[0]} v{meta[1]}, but no tracking store is configured to check its files against "
                "the hashes recorded at registration. Set MLFLOW_TRACKING_URI to the store it is registered in."
            )
        try:
            versions = [MlflowClient().get_model_version(*meta)]
        except MlflowException as error:
            raise ModelIntegrityError(
                f"{root} says it is {meta[0]} v{meta[1]}, which the tracking store does not hold ({error.message}); "
                "load a version the registry lists."
            ) from error
    else:
        versions = _versions_of(root)
    if not versions:
        return None
    version = versions[0]
    label = f"{version.name} v{version.version}"
    record = version.tags.get(ARTIFACT_FILES_TAG)
    if record is None:
        logger.warning("%s was registered before its files' hashes were recorded: loaded unverified.", label)
        return label
    problems = record_mismatches(root, record)
    if problems:
        raise ModelIntegrityError(
            f"{label} was changed after it was registered, so it is not served: {'; '.join(problems)}. Restore its "
            "files from a copy, or register the model again (materialize checkpoint_accuracy)."
        )
    return label
