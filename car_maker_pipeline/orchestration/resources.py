"""Dagster resources, chosen per profile (demo or real) like hooli's per-environment resources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from car_maker_pipeline.data.source_schema import SourceError
from car_maker_pipeline.machine import heavy_imports
from car_maker_pipeline.redaction import leaks_secret, redact_text
from car_maker_pipeline.settings import Profile, get_profile, pipeline_home
from car_maker_pipeline.store import LORA_CHECKPOINTS, LORA_SWEEP, PipelineStore

if TYPE_CHECKING:  # the definitions load in every Dagster process; `datasets` is imported by the steps that read data
    from car_maker_pipeline.data.source import RawDataset

MLFLOW_UI_ENV = "CAR_MAKER_MLFLOW_UI"


class StoreResource(dg.ConfigurableResource):
    """The pipeline's store (CAR_MAKER_HOME by default) for assets: `store.get()` is the plain object."""

    home: str = Field(default_factory=lambda: str(pipeline_home()), description="Root folder (CAR_MAKER_HOME).")

    def get(self) -> PipelineStore:
        return PipelineStore(Path(self.home))


class StanfordCarsSource(dg.ConfigurableResource):
    """The Stanford Cars source: the Hub dataset (real profile) or a generated demo copy.

    `path_or_id` overrides the profile's source with a Hub id or a local Stanford-Cars-shaped folder.
    The Hub token comes from the environment variable named by `token_env` and is never logged.
    """

    profile: str = Field(default_factory=lambda: get_profile().name)
    path_or_id: str | None = None
    revision: str | None = None
    token_env: str = "HF_TOKEN"
    # Per maker on average: a split holds per-maker x makers rows, shared out by `demo_balance`. Train is
    # large enough that its validation tenth (216 images) can certify the demo's 95% target precision
    # (evaluation/settings.py): 36, with no mistake at all, would certify about 83% at best.
    demo_train_per_maker: int = 360
    demo_test_per_maker: int = 30
    demo_corruptions: list[str] = ["contrast", "gaussian_noise", "motion_blur"]
    demo_seed: int = 0
    demo_makers: list[str] = Field(default=[], description="Demo makers (empty: the six default demo makers).")
    demo_image_sizes: str = Field(default="demo", description="demo (all 128x96) or realistic (real photo sizes).")
    demo_balance: str = Field(
        default="stanford",
        description="stanford: each maker's share follows its real number of classes, as in Stanford Cars "
        "(offline/population.py lists them); uniform: the same number of images per maker.",
    )
    demo_train_total: int | None = Field(default=None, description="Train rows in all (default per-maker x makers).")
    demo_test_total: int | None = Field(default=None, description="Test rows in all (default per-maker x makers).")

    def _profile(self) -> Profile:
        return get_profile(self.profile)

    def resolve(self, store: PipelineStore) -> str:
        """The path or Hub id that `datasets.load_dataset` will read (the demo copy is generated on first use)."""
        if self.path_or_id:
            return self.path_or_id
        profile = self._profile()
        if not profile.is_demo:
            return profile.dataset_id
        from car_maker_pipeline.offline.demo_source import ensure_demo_source

        options = {"makers": self.demo_makers} if self.demo_makers else {}
        folder = ensure_demo_source(
            store.root / "demo_source",
            train_per_maker=self.demo_train_per_maker,
            test_per_maker=self.demo_test_per_maker,
            corruptions=self.demo_corruptions,
            seed=self.demo_seed,
            image_sizes=self.demo_image_sizes,
            balance=self.demo_balance,
            train_total=self.demo_train_total,
            test_total=self.demo_test_total,
            **options,
        )
        return str(folder)

    def materialize(self, store: PipelineStore) -> RawDataset:
        from car_maker_pipeline.data.source import materialize_raw

        token = os.environ.get(self.token_env) or None
        try:
            return materialize_raw(self.resolve(store), store.root, revision=self.revision, token=token)
        except Exception as error:
            # A credential in the source's URL, or one a library quotes back, must not reach the step's
            # error, which Dagster stores and shows: such an error is replaced (not chained) by its
            # redacted message.
            if not leaks_secret(error):
                raise
            raise SourceError(redact_text(str(error))) from None


# Libraries the model steps import in their bodies (lazily: every Dagster process loads the definitions),
# beyond the model libraries: every step reads the dataset and evaluates, drawing figures; training steps
# also need TRL.
EVALUATION_LIBRARIES = ("datasets", "matplotlib.pyplot")
TRAINING_LIBRARIES = ("trl",)
TRAINING_STEPS = frozenset({LORA_CHECKPOINTS, LORA_SWEEP})


def step_libraries(run: dg.DagsterRun | None) -> tuple[str, ...]:
    """What the run's model steps will import: the training libraries only when it trains (a run that does
    not say which steps it runs may train)."""
    selected = None
    if run is not None and run.asset_selection is not None:
        selected = {key.to_user_string() for key in run.asset_selection}
    elif run is not None and run.step_keys_to_execute is not None:
        selected = set(run.step_keys_to_execute)
    trains = selected is None or bool(selected & TRAINING_STEPS)
    return EVALUATION_LIBRARIES + (TRAINING_LIBRARIES if trains else ())


class VisionLanguageModels(dg.ConfigurableResource):
    """The models to evaluate and fine-tune: the `model` dimension of the model assets' partitions.

    Real profile: the LiquidAI LFM2-VL Hub ids. Demo profile: tiny random LFM2-VL models built on
    first use under CAR_MAKER_HOME/demo_models. `overrides` maps a model key to another Hub id
    or local directory. Loading never trusts remote code and reads safetensors only.
    """

    profile: str = Field(default_factory=lambda: get_profile().name)
    overrides: dict[str, str] = {}
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: str = Field(default="auto", description="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    demo_seed: int = 0

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Dagster sets resources up before the run's steps claim their pool slots (once per run in
        # process, once per step process otherwise): importing what the model steps import here keeps
        # those seconds out of the `gpu` slot that other runs queue for.
        import importlib

        with heavy_imports():
            from car_maker_pipeline.models.loading import import_model_libraries

            import_model_libraries()
            for module in step_libraries(context.dagster_run):
                importlib.import_module(module)

    def model_keys(self) -> list[str]:
        return get_profile(self.profile).model_keys

    def path_or_id(self, key: str, store: PipelineStore) -> str:
        if key in self.overrides:
            return self.overrides[key]
        models = get_profile(self.profile).models
        if key not in models:
            raise ValueError(f"Unknown model {key!r} for profile {self.profile!r}; known: {list(models)}.")
        if models[key] is not None:
            return models[key]
        from car_maker_pipeline.offline.tiny_models import ensure_demo_model

        return str(ensure_demo_model(store.root / "demo_models", key, seed=self.demo_seed))

    def load(self, key: str, store: PipelineStore):
        from car_maker_pipeline.models.loading import load_model_and_processor

        return load_model_and_processor(self.path_or_id(key, store), device=self.device, dtype=self.dtype)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking: local sqlite under CAR_MAKER_HOME by default, or any URI MLflow accepts."""

    tracking_uri: str | None = Field(
        default=None, description="Any URI MLflow accepts; unset: MLFLOW_TRACKING_URI, else local sqlite."
    )
    # MLflow's own defaults retry a dead server for minutes per call; a pipeline step should notice
    # within seconds (training buffers its metrics meanwhile). Environment variables still win.
    http_request_max_retries: int = Field(default=2, ge=0, description="MLFLOW_HTTP_REQUEST_MAX_RETRIES unless set.")
    http_request_timeout_s: int = Field(default=20, gt=0, description="MLFLOW_HTTP_REQUEST_TIMEOUT unless set.")
    ui_url: str | None = Field(
        default_factory=lambda: os.environ.get(MLFLOW_UI_ENV) or None,
        description=f"Where people open the MLflow UI for these runs (default {MLFLOW_UI_ENV}; `make mlflow-ui` serves "
        "http://127.0.0.1:5000). Each materialization links to its run and registered version there; unset, the "
        "tracking server itself when it is http(s), else no links.",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every step that tracks imports MLflow, and the SQL store when it opens the store itself (the local
        # sqlite default): a second of imports, done here before pool slots are claimed. Only the URI's kind
        # matters here, so the default home stands in for the store's.
        with heavy_imports():
            import mlflow  # noqa: F401

            from car_maker_pipeline.tracking import is_tracking_server

            if not is_tracking_server(self.uri(PipelineStore.from_env())):
                import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    def uri(self, store: PipelineStore) -> str:
        from car_maker_pipeline.tracking import configured_tracking_uri

        return self.tracking_uri or configured_tracking_uri(store.root)

    def ensure_reachable(self, store: PipelineStore) -> str:
        """The URI to use from here on: reachable, and without credentials (those go to MLflow's variables)."""
        from car_maker_pipeline.tracking import ensure_reachable

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.http_request_max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.http_request_timeout_s))
        return ensure_reachable(self.uri(store))

    def links(self, uri: str, run_id: str | None = None, model_version: tuple[str, str] | None = None) -> dict:
        """`MetadataValue.url`s to the MLflow run and the registered (name, version), where a UI serves them."""
        from car_maker_pipeline.tracking import model_version_link, run_link, ui_base

        base = ui_base(uri, self.ui_url)
        if base is None:
            return {}
        links = {"mlflow_run": dg.MetadataValue.url(run_link(base, uri, run_id))} if run_id else {}
        if model_version is not None:
            links["registered_model_version"] = dg.MetadataValue.url(model_version_link(base, *model_version))
        return links
