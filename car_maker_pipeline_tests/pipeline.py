"""In-process Dagster helpers: the project's resources on a throwaway home, and the data assets built once."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


def demo_resources(home: Path, train_per_maker: int, test_per_maker: int, corruptions: list[str]) -> dict:
    from car_maker_pipeline.orchestration.resources import MlflowTracking, PipelineStore, StanfordCarsSource, VisionLanguageModels

    return {
        "store": PipelineStore(home=str(home)),
        "source": StanfordCarsSource(profile="demo", demo_train_per_maker=train_per_maker,
                                     demo_test_per_maker=test_per_maker, demo_corruptions=corruptions),
        "models": VisionLanguageModels(profile="demo"),
        "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}"),
    }


def materialize_data(resources: dict, instance: dg.DagsterInstance, with_checks: bool = False):
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, data_checks, raw_stanford_cars

    result = dg.materialize([raw_stanford_cars, car_maker_dataset, *(data_checks if with_checks else [])],
                            resources=resources, instance=instance)
    assert result.success
    return result
