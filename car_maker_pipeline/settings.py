"""Profiles: the same code runs offline on a generated demo source and tiny models, or on the real
Stanford Cars and LFM2-VL models from the Hugging Face Hub.

The profile is one switch, the environment variable `CAR_MAKER_PROFILE` (`demo`, the default, or
`real`), read when the Dagster definitions load, because the model partitions depend on it.
Where generated data, models, checkpoints and stores live is `CAR_MAKER_HOME` (default
`.car_maker_home` under the working directory). `CAR_MAKER_CACHE`, when set, names a folder where what
every new home would build identically is built once and copied from (unset: each home builds its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_ENV = "CAR_MAKER_PROFILE"
HOME_ENV = "CAR_MAKER_HOME"
CACHE_ENV = "CAR_MAKER_CACHE"
DEMO = "demo"
REAL = "real"

REAL_DATASET_ID = "tanganke/stanford_cars"
REAL_MODELS = {
    "lfm2-vl-450m": "LiquidAI/LFM2-VL-450M",
    "lfm2-vl-1.6b": "LiquidAI/LFM2-VL-1.6B",
    "lfm2-vl-3b": "LiquidAI/LFM2-VL-3B",
}
# Demo models are built on first use under CAR_MAKER_HOME/demo_models/<name>.
DEMO_MODEL_NAMES = ("tiny-s", "tiny-m", "tiny-l")


class ProfileError(ValueError):
    """An unknown profile name."""


@dataclass(frozen=True)
class Profile:
    name: str
    # Where `datasets.load_dataset` reads the source: a Hub id, or None for the generated demo source.
    dataset_id: str | None
    # Partition key -> Hub id; None for demo models (built locally on first use).
    models: dict[str, str | None] = field(default_factory=dict)

    @property
    def is_demo(self) -> bool:
        return self.name == DEMO

    @property
    def model_keys(self) -> list[str]:
        return list(self.models)


def get_profile(name: str | None = None) -> Profile:
    name = (name or os.environ.get(PROFILE_ENV) or DEMO).strip().lower()
    if name == DEMO:
        return Profile(DEMO, dataset_id=None, models={key: None for key in DEMO_MODEL_NAMES})
    if name == REAL:
        return Profile(REAL, dataset_id=REAL_DATASET_ID, models=dict(REAL_MODELS))
    raise ProfileError(f"Unknown profile {name!r} in {PROFILE_ENV}; use {DEMO!r} (offline, default) or {REAL!r}.")


def pipeline_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.cwd() / ".car_maker_home").resolve()


def cache_root() -> Path | None:
    """The build cache (`CAR_MAKER_CACHE`), or None: a folder for what the pipeline builds byte for byte the
    same in every new home (demo sources, tiny models, an empty MLflow store), built there once and copied."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else None
