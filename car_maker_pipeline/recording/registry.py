"""The chosen checkpoint as a registered MLflow model: logged as a pyfunc, versioned, and aliased.

`register_classifier` runs inside the checkpoint evaluation's MLflow run. It logs the adapter as a
models-from-code pyfunc model (`pyfunc_model.py`) with a signature, an input example, pinned pip
requirements and this package as code, registers it as a new version of `car-maker-<model>` with
the tags the registry has always carried, records which data the run saw (`log_dataset_inputs`),
and moves the aliases:

- `challenger` always names the newest version;
- `champion` moves to it only when its validation accuracy beats the current champion's on the same
  maker list (a first version becomes champion). Equal is not better: the champion stays.

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

from car_maker_pipeline.serving.predictor import (
    ADAPTER_ARTIFACT,
    IMAGE_COLUMN,
    MAKERS_ARTIFACT,
    OUTPUT_SCHEMA,
    ClassifierCard,
)

REGISTERED_MODEL_PREFIX = "car-maker-"  # + the model key: one registered model per base model
CHAMPION, CHALLENGER = "champion", "challenger"
# Logged as the model's code: the whole package, and the models-from-code file that MLflow runs to load it.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_MODEL_FILE = PACKAGE_DIR / "serving" / "pyfunc_model.py"
LOGGED_MODEL_NAME = "classifier"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
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


def registered_name(model_key: str) -> str:
    return f"{REGISTERED_MODEL_PREFIX}{model_key}"


def registered_versions(uri: str, name: str | None = None) -> list:
    """The versions of `name`, or of every car-maker model when no name is given."""
    from mlflow import MlflowClient

    query = f"name = '{name}'" if name else f"name LIKE '{REGISTERED_MODEL_PREFIX}%'"
    return list(MlflowClient(uri).search_model_versions(query))


def model_uri(model_key: str, alias: str = CHAMPION) -> str:
    return f"models:/{registered_name(model_key)}@{alias}"


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


@dataclass(frozen=True)
class ChampionRecord:
    version: str
    val_accuracy: float | None
    maker_list_hash: str | None


@dataclass(frozen=True)
class AliasDecision:
    promoted: bool
    reason: str
    candidate_val_accuracy: float
    champion_before: ChampionRecord | None

    @property
    def label(self) -> str:
        return "promoted" if self.promoted else "kept"


def decide_champion(val_accuracy: float, makers_hash: str, champion: ChampionRecord | None) -> AliasDecision:
    """Whether the new version takes the `champion` alias (pure: the rule, apart from MLflow)."""
    if champion is None:
        return AliasDecision(True, "no champion yet: the first version becomes champion", val_accuracy, None)
    if champion.maker_list_hash != makers_hash or champion.val_accuracy is None:
        return AliasDecision(
            False,
            f"champion v{champion.version} classifies into another maker list, so the accuracies do not compare; "
            "it stays champion (move the alias by hand if the new maker list is the one to serve)",
            val_accuracy,
            champion,
        )
    if val_accuracy > champion.val_accuracy:
        return AliasDecision(
            True,
            f"validation accuracy {val_accuracy:.4f} beats champion v{champion.version}'s {champion.val_accuracy:.4f}",
            val_accuracy,
            champion,
        )
    return AliasDecision(
        False,
        f"validation accuracy {val_accuracy:.4f} does not beat champion v{champion.version}'s "
        f"{champion.val_accuracy:.4f}; it stays champion",
        val_accuracy,
        champion,
    )


@dataclass(frozen=True)
class RegisteredClassifier:
    name: str
    version: str
    decision: AliasDecision

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def metadata(self) -> dict:
        """The asset's metadata: the version, the alias decision and both accuracies compared."""
        before = self.decision.champion_before
        return {
            "model_uri": self.uri,
            "champion_decision": f"{self.decision.label}: {self.decision.reason}",
            "champion_version": self.version if self.decision.promoted else (before.version if before else ""),
            "challenger_val_accuracy": self.decision.candidate_val_accuracy,
            "previous_champion_version": before.version if before else "",
            "previous_champion_val_accuracy": before.val_accuracy
            if before and before.val_accuracy is not None
            else float("nan"),
        }


def current_champion(client, name: str) -> ChampionRecord | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model yet, or no champion alias on it
        return None
    exact = version.tags.get("val_accuracy_exact", version.tags.get("val_accuracy"))
    return ChampionRecord(
        str(version.version), float(exact) if exact is not None else None, version.tags.get("maker_list_hash")
    )


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


def register_classifier(
    candidate: Candidate, *, uri: str, dataset_record, tags: dict[str, str]
) -> RegisteredClassifier:
    """Log, register and alias the candidate inside the active MLflow run; see the module docstring.

    `tags` are the version's tags beyond those derived from the candidate (the Dagster run id).
    """
    import mlflow
    from mlflow import MlflowClient

    from car_maker_pipeline.recording.lineage import log_dataset_inputs

    name = registered_name(candidate.model_key)
    client = MlflowClient(uri)
    makers_hash = maker_list_hash(candidate.card.makers)
    log_dataset_inputs(dataset_record)
    with tempfile.TemporaryDirectory(prefix="car-maker-pyfunc-") as staging:
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts=_stage_artifacts(candidate, Path(staging)),
            model_config={**candidate.card.model_config(), **RUNTIME_CONFIG},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(),
            input_example=_input_example(dataset_record),
            pip_requirements=pinned_requirements(),
        )
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
    }
    champion = current_champion(client, name)
    registered = mlflow.register_model(info.model_uri, name, tags=version_tags)
    version = str(registered.version)
    client.update_registered_model(
        name,
        description=(
            "Car-maker classifier: a LoRA-tuned vision-language model as an MLflow pyfunc model (one image per "
            "row as bytes in column `image`; returns the maker, its calibrated probability, the answer (`unsure` below "
            "the confidence threshold certified on validation) and the next two makers). @champion is the validation-best "
            "version, @challenger the newest; base model and accuracies are in the version tags."
        ),
    )
    decision = decide_champion(candidate.val_accuracy, makers_hash, champion)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    record = {
        "champion_decision": decision.label,
        "champion_decision_reason": decision.reason,
        "compared_with_version": champion.version if champion else "",
    }
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    mlflow.set_tags({**record, "registered_model": f"{name}/{version}"})
    mlflow.log_metric("challenger_val_accuracy", candidate.val_accuracy)
    if champion is not None and champion.val_accuracy is not None:
        mlflow.log_metric("champion_val_accuracy_before", champion.val_accuracy)
    return RegisteredClassifier(name, version, decision)


class NoChampionError(LookupError):
    """A registered model without a champion version (or no registered model at all)."""


def champion_version(uri: str, model_key: str):
    """The MLflow ModelVersion that `car-maker-<model_key>@champion` names now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = registered_name(model_key)
    try:
        return MlflowClient(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        raise NoChampionError(
            f"{name} has no @{CHAMPION} version in {uri}. Materialize checkpoint_accuracy for {model_key} first "
            f"(it registers the checkpoint chosen on validation), e.g. `dagster asset materialize -m car_maker_pipeline "
            f"--select lora_checkpoints,checkpoint_accuracy --partition {model_key}`."
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
