"""The champion/challenger aliases, moved only to a version whose run has finished, one registration at a time.

- `challenger` names the newest version;
- `champion` moves to a version only when its validation accuracy beats the current champion's on
  the same maker list (a first version becomes champion; equal is not better). A champion whose run
  was deleted or did not finish is no champion: the next finished version replaces it.

`promote` runs after the registering MLflow run has ended FINISHED, so an alias never names the
version of a run that was killed, failed, or deleted as an orphan. Two registrations of one model
at once (two Dagster instances sharing an MLflow store) take turns: the decision and the alias
moves happen under a file lock beside the sqlite store (or in the pipeline home for a tracking
server, which instances on other machines then need to share, as they share the home anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from car_maker_pipeline.recording.registry import CHALLENGER, CHAMPION, RegisteredVersion


class RegistrationError(RuntimeError):
    """A version that cannot be given an alias; the message says why and what to do."""


@dataclass(frozen=True)
class ChampionRecord:
    version: str
    val_accuracy: float | None
    maker_list_hash: str | None
    run_finished: bool = True  # False: its run was deleted or did not finish, so it is no champion to keep


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
    if not champion.run_finished:
        return AliasDecision(
            True, f"champion v{champion.version}'s run was deleted or did not finish: replaced", val_accuracy, champion
        )
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


def _run_finished(client, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"


def current_champion(client, name: str) -> ChampionRecord | None:
    """The version @champion names now (None when there is none), and whether its run finished."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model yet, or no champion alias on it
        return None
    exact = version.tags.get("val_accuracy_exact", version.tags.get("val_accuracy"))
    return ChampionRecord(
        str(version.version),
        float(exact) if exact is not None else None,
        version.tags.get("maker_list_hash"),
        _run_finished(client, version.run_id),
    )


def _alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(registered: RegisteredVersion, *, uri: str, home: Path) -> RegisteredClassifier:
    """Move the aliases for `registered` (see the module docstring) and record the decision on the version
    and its run. Call it after the run that registered the version has ended."""
    from mlflow import MlflowClient

    from car_maker_pipeline.tracking import registry_lock

    client = MlflowClient(uri)
    name, version = registered.name, registered.version
    with registry_lock(uri, home, name):
        if not _run_finished(client, registered.run_id):
            raise RegistrationError(
                f"{name} v{version} gets no alias: its MLflow run {registered.run_id} did not finish (it failed, is "
                "still running, or was deleted). Materialize checkpoint_accuracy again to register a new version."
            )
        champion = current_champion(client, name)
        decision = decide_champion(registered.val_accuracy, registered.maker_list_hash, champion)
        newest = _alias_version(client, name, CHALLENGER)
        if newest is None or int(version) > newest:  # another registration may have made a newer one meanwhile
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
        client.set_tag(registered.run_id, key, value)
    client.log_metric(registered.run_id, "challenger_val_accuracy", registered.val_accuracy)
    if champion is not None and champion.val_accuracy is not None:
        client.log_metric(registered.run_id, "champion_val_accuracy_before", champion.val_accuracy)
    return RegisteredClassifier(name, version, decision)
