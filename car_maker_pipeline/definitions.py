"""The Dagster code location: assets, checks, jobs and resources for the active profile."""

import dagster as dg

from car_maker_pipeline.orchestration.assets.baseline import baseline_assets
from car_maker_pipeline.orchestration.assets.data import data_assets
from car_maker_pipeline.orchestration.assets.evaluation import evaluation_assets
from car_maker_pipeline.orchestration.assets.labeling import AdditionsFolder, labeling_assets
from car_maker_pipeline.orchestration.assets.serving import IncomingImages, serving_assets
from car_maker_pipeline.orchestration.assets.sweep import sweep_assets
from car_maker_pipeline.orchestration.assets.training import training_assets
from car_maker_pipeline.orchestration.automation import automation_jobs, schedules, sensors
from car_maker_pipeline.orchestration.deployment import executor
from car_maker_pipeline.orchestration.incoming import sensors as incoming_sensors
from car_maker_pipeline.orchestration.jobs import jobs
from car_maker_pipeline.orchestration.resources import (
    MlflowTracking,
    StanfordCarsSource,
    StoreResource,
    VisionLanguageModels,
)

defs = dg.Definitions(
    assets=[
        *data_assets,
        *baseline_assets,
        *training_assets,
        *sweep_assets,
        *evaluation_assets,
        *serving_assets,
        *labeling_assets,
    ],
    jobs=[*jobs, *automation_jobs],
    schedules=schedules,
    sensors=[*sensors, *incoming_sensors],
    executor=executor(),  # local processes, or one Kubernetes Job per step with CAR_MAKER_EXECUTOR=k8s
    resources={
        "store": StoreResource(),
        "source": StanfordCarsSource(),
        "models": VisionLanguageModels(),
        "mlflow_tracking": MlflowTracking(),
        "incoming_images": IncomingImages(),
        "additions": AdditionsFolder(),
    },
)
