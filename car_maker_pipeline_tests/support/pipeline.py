"""In-process Dagster helper: the project's resources on a throwaway home, with the data assets built."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


def materialized_demo_data(home: Path, train_per_maker: int, test_per_maker: int, corruptions: list[str]):
    """(resources, instance, result) after materializing raw_stanford_cars and car_maker_dataset (with its
    blocking checks) in `home`."""
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
    from car_maker_pipeline.orchestration.resources import (
        MlflowTracking,
        StanfordCarsSource,
        StoreResource,
        VisionLanguageModels,
    )
    from car_maker_pipeline.tracking import default_tracking_uri

    resources = {
        "store": StoreResource(home=str(home)),
        "source": StanfordCarsSource(
            profile="demo",
            demo_train_per_maker=train_per_maker,
            demo_test_per_maker=test_per_maker,
            demo_corruptions=corruptions,
        ),
        "models": VisionLanguageModels(profile="demo"),
        "mlflow_tracking": MlflowTracking(tracking_uri=default_tracking_uri(home)),
    }
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [raw_stanford_cars, car_maker_dataset],
        resources=resources,
        instance=instance,
    )
    assert result.success
    return resources, instance, result
