"""Dagster resources, chosen per profile (demo or real) like hooli's per-environment resources."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.data.source import RawDataset, materialize_raw
from car_maker_pipeline.settings import Profile, get_profile, pipeline_home
from car_maker_pipeline.storage import read_manifest, write_json_atomic


class PipelineStore(dg.ConfigurableResource):
    """Where the pipeline keeps generated data, models, checkpoints and each asset's manifest."""

    home: str = Field(default_factory=lambda: str(pipeline_home()), description="Root folder (CAR_MAKER_HOME).")

    @property
    def root(self) -> Path:
        return Path(self.home)

    def manifest_path(self, asset: str, partition: str | None = None) -> Path:
        folder = self.root / asset if partition is None else self.root / asset / partition
        return folder / "current.json"

    def write_manifest(self, asset: str, payload: dict, partition: str | None = None) -> None:
        write_json_atomic(self.manifest_path(asset, partition), payload)

    def read_manifest(self, asset: str, partition: str | None = None) -> dict:
        return read_manifest(self.manifest_path(asset, partition), produced_by=asset)


class StanfordCarsSource(dg.ConfigurableResource):
    """The Stanford Cars source: the Hub dataset (real profile) or a generated demo copy.

    `path_or_id` overrides the profile's source with a Hub id or a local Stanford-Cars-shaped folder.
    The Hub token comes from the environment variable named by `token_env` and is never logged.
    """

    profile: str = Field(default_factory=lambda: get_profile().name)
    path_or_id: str | None = None
    revision: str | None = None
    token_env: str = "HF_TOKEN"
    demo_train_per_maker: int = 60
    demo_test_per_maker: int = 30
    demo_corruptions: list[str] = ["contrast", "gaussian_noise", "motion_blur"]
    demo_seed: int = 0

    def _profile(self) -> Profile:
        return get_profile(self.profile)

    def resolve(self, home: Path) -> str:
        """The path or Hub id that `datasets.load_dataset` will read, generating the demo copy if needed."""
        if self.path_or_id:
            return self.path_or_id
        profile = self._profile()
        if not profile.is_demo:
            return profile.dataset_id
        from car_maker_pipeline.data.synthetic import generate_demo_source

        name = f"seed{self.demo_seed}-train{self.demo_train_per_maker}-test{self.demo_test_per_maker}-{'_'.join(self.demo_corruptions) or 'none'}"
        folder = home / "demo_source" / name
        if not (folder / "data").is_dir():
            generate_demo_source(
                folder,
                train_per_maker=self.demo_train_per_maker,
                test_per_maker=self.demo_test_per_maker,
                corruptions=tuple(self.demo_corruptions),
                seed=self.demo_seed,
            )
        return str(folder)

    def materialize(self, home: Path) -> RawDataset:
        return materialize_raw(
            self.resolve(home), home, revision=self.revision, token=os.environ.get(self.token_env) or None
        )


class VisionLanguageModels(dg.ConfigurableResource):
    """The models to evaluate and fine-tune, one Dagster partition each.

    Real profile: the LiquidAI LFM2-VL Hub ids. Demo profile: tiny random LFM2-VL models built on
    first use under CAR_MAKER_HOME/demo_models. `overrides` maps a partition key to another Hub id
    or local directory. Loading never trusts remote code and reads safetensors only.
    """

    profile: str = Field(default_factory=lambda: get_profile().name)
    overrides: dict[str, str] = {}
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: str = Field(default="auto", description="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    demo_seed: int = 0

    def model_keys(self) -> list[str]:
        return get_profile(self.profile).model_keys

    def path_or_id(self, key: str, home: Path) -> str:
        if key in self.overrides:
            return self.overrides[key]
        models = get_profile(self.profile).models
        if key not in models:
            raise ValueError(f"Unknown model {key!r} for profile {self.profile!r}; known: {list(models)}.")
        if models[key] is not None:
            return models[key]
        from car_maker_pipeline.models.tiny import build_tiny_model

        return str(build_tiny_model(home / "demo_models" / f"{key}-seed{self.demo_seed}", key, seed=self.demo_seed))

    def load(self, key: str, home: Path):
        from car_maker_pipeline.models.loading import load_model_and_processor

        return load_model_and_processor(self.path_or_id(key, home), device=self.device, dtype=self.dtype)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking: local sqlite under CAR_MAKER_HOME by default, or any URI MLflow accepts."""

    tracking_uri: str | None = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or None)
    experiment_name: str = "car_maker_pipeline"
    # MLflow's own defaults retry a dead server for minutes per call; a pipeline step should notice
    # within seconds (training buffers its metrics meanwhile). Environment variables still win.
    http_request_max_retries: int = Field(default=2, ge=0, description="MLFLOW_HTTP_REQUEST_MAX_RETRIES unless set.")
    http_request_timeout_s: int = Field(default=20, gt=0, description="MLFLOW_HTTP_REQUEST_TIMEOUT unless set.")

    def uri(self, home: Path) -> str:
        from car_maker_pipeline.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri(home)

    def ensure_reachable(self, home: Path) -> str:
        from car_maker_pipeline.tracking import ensure_reachable

        uri = self.uri(home)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.http_request_max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.http_request_timeout_s))
        ensure_reachable(uri)
        return uri
