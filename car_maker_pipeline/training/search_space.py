"""What a hyperparameter sweep may vary: a search space over `LoraHyperparameters` fields, checked up front.

A search space maps a field name to a range, `{low, high, log}` (int fields draw integers, float
fields floats; `log` draws on a log scale), or to `{choices: [...]}`. Fields not named keep the values
`lora_checkpoints` would train with. `target_modules` choices are lists of module names; Optuna stores
categorical values as plain scalars, so a list is stored as its names joined by commas.

Every mistake is reported before any trial: an unknown field, an empty or inverted range, a log range
not above zero, an empty choice list, a value the field itself refuses (each choice and each end of a
range is tried on the base settings).

`SweepSettings`, how a sweep searches (trials, space, objective, pruner, seed, storage), lives here
rather than beside the Optuna code in `sweep.py`: the `lora_sweep` asset's config reads it in every
Dagster process that loads the definitions, and none of them needs Optuna until a sweep runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from car_maker_pipeline.evaluation.settings import DEFAULT_SELECTION_METRIC, SELECTION_METRICS
from car_maker_pipeline.training.config import DEFAULT_TARGET_MODULES, LoraHyperparameters, LoraTrainingError

LIST_SEPARATOR = ","
STORAGE_ENV = "CAR_MAKER_OPTUNA_STORAGE"  # the study database's SQLAlchemy URL, when the settings name none
# Never searched: they name a folder or a process, not a model.
NOT_SEARCHABLE = frozenset({"fresh_start"})

# A search that makes sense for LFM2-VL: the learning rate on a log scale around Liquid's (2e-4) and the
# demo's (5e-3), the adapter's size and scale, the run's length, how rows are drawn, and which layers adapt
# (all of Liquid's recipe, or the language model's attention and convolutions alone).
DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
    "lora_r": {"choices": [4, 8, 16]},
    "lora_alpha": {"choices": [8, 16, 32]},
    "lora_dropout": {"low": 0.0, "high": 0.1},
    "max_steps": {"choices": [200, 400]},
    "sampling": {"choices": ["natural", "balanced"]},
    "target_modules": {
        "choices": [list(DEFAULT_TARGET_MODULES), ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj"]]
    },
}


class ParameterRange(BaseModel):
    """One field's range: low/high (with log) or choices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = Field(default=None)

    @model_validator(mode="after")
    def _one_kind(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty: list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        if self.low >= self.high:
            raise ValueError(f"the range is empty or inverted (low {self.low} >= high {self.high}): make low < high")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must lie above zero (low {self.low})")
        return self


def _is_int(name: str) -> bool:
    return LoraHyperparameters.model_fields[name].annotation is int


def parse_search_space(space: dict[str, Any], base: LoraHyperparameters) -> dict[str, ParameterRange]:
    """The search space as ranges, or `LoraTrainingError` naming every field that is wrong and how."""
    problems, ranges = [], {}
    for name, spec in space.items():  # first each field alone
        if name not in LoraHyperparameters.model_fields or name in NOT_SEARCHABLE:
            known = ", ".join(sorted(set(LoraHyperparameters.model_fields) - NOT_SEARCHABLE))
            problems.append(f"{name!r} is not a LoraHyperparameters field (one of: {known})")
            continue
        try:
            ranges[name] = ParameterRange(**spec) if isinstance(spec, dict) else ParameterRange(choices=spec)
        except (ValueError, TypeError) as error:
            problems.append(f"{name}: {_first_message(error)}")
    # Then each value on the base settings with every other searched field at its first value (fields that
    # bound each other, such as max_steps and checkpoint_every_n_steps, are searched together).
    reference = {**base.to_json(), **{name: _corners(name, spec)[0] for name, spec in ranges.items()}}
    for name, spec in ranges.items():
        for value in _corners(name, spec):
            try:
                LoraHyperparameters(**{**reference, name: value})
            except ValueError as error:
                problems.append(f"{name}={value!r} is not a usable value: {_first_message(error)}")
    if not ranges and not problems:
        problems.append("the search space is empty: name at least one field to vary")
    if problems:
        raise LoraTrainingError("Bad search_space for lora_sweep: " + "; ".join(problems))
    return ranges


def _first_message(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", e)).removeprefix("Value error, ") for e in errors())
    return str(error)


def _corners(name: str, spec: ParameterRange) -> list[Any]:
    if spec.choices is not None:
        return list(spec.choices)
    if _is_int(name):
        return [int(spec.low), int(spec.high)]
    return [spec.low, spec.high]


def suggest(trial, ranges: dict[str, ParameterRange]) -> dict[str, Any]:
    """The trial's values for every searched field, drawn through Optuna's `suggest_*` (its sampler decides)."""
    values = {}
    for name, spec in sorted(ranges.items()):
        if spec.choices is not None:
            encoded = [_encode(choice) for choice in spec.choices]
            values[name] = _decode(name, trial.suggest_categorical(name, encoded))
        elif _is_int(name):
            values[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        else:
            values[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return values


def _encode(value: Any) -> Any:
    return LIST_SEPARATOR.join(value) if isinstance(value, list) else value


def _decode(name: str, value: Any) -> Any:
    if name == "target_modules" and isinstance(value, str):
        return value.split(LIST_SEPARATOR)
    return value


def decoded_params(params: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's params (as Optuna stores them) as LoraHyperparameters values."""
    return {name: _decode(name, value) for name, value in params.items()}


class SweepSettings(BaseModel):
    """How to search: the trials, the space, the objective, the pruner, the seed, the heartbeat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_trials: int = Field(
        default=12, gt=0, description="Trials to finish (complete or pruned); failed ones do not count."
    )
    search_space: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SEARCH_SPACE),
        description="LoraHyperparameters field -> {low, high, log} or {choices: [...]}; other fields keep "
        "lora_checkpoints' values.",
    )
    objective: str = Field(
        default=DEFAULT_SELECTION_METRIC,
        description="What a trial maximises, on validation, at its best checkpoint: "
        + "; ".join(f"{key}: {label}" for key, label in SELECTION_METRICS.items()),
    )
    pruner: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = Field(
        default="median", description="Optuna pruner fed every checkpoint's validation score (MedianPruner by default)."
    )
    pruner_startup_trials: int = Field(default=3, ge=0, description="median/percentile: trials before any pruning.")
    pruner_warmup_steps: int = Field(
        default=0, ge=0, description="median/percentile: steps before a trial may be pruned."
    )
    seed: int = Field(default=0, ge=0, description="Seeds the sampler (TPE), per trial number.")
    heartbeat_interval_s: int = Field(default=10, gt=0, description="How often a running trial says it is alive.")
    grace_period_s: int | None = Field(
        default=None, gt=0, description="A running trial silent this long is failed (default 3 heartbeats)."
    )
    storage_url: str | None = Field(
        default=None,
        description=f"SQLAlchemy URL of the study's database; unset: {STORAGE_ENV}, else sqlite under CAR_MAKER_HOME.",
    )

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in SELECTION_METRICS:
            raise ValueError(f"unknown objective {value!r}; use one of {', '.join(SELECTION_METRICS)}")
        return value
