"""In-process Dagster helper: the project's resources on a throwaway home, with the data assets built."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


def demo_split_rows(per_maker: int) -> int:
    """Rows of a demo split with `per_maker` images per maker on average, at the demo profile's default balance.

    Not simply per_maker x 6: the default (stanford) balance gives every maker at least
    MIN_IMAGES_PER_MAKER images, which a rare maker's real share of a small split can fall below.
    """
    from car_maker_pipeline.offline.demo_source import DEMO_MAKERS
    from car_maker_pipeline.offline.population import images_per_maker
    from car_maker_pipeline.offline.rendering import classes_by_maker
    from car_maker_pipeline.orchestration.resources import StanfordCarsSource

    balance = StanfordCarsSource.model_fields["demo_balance"].default
    class_counts = {maker: len(classes) for maker, classes in classes_by_maker().items()}
    return sum(images_per_maker(DEMO_MAKERS, per_maker, balance, class_counts).values())


def materialized_demo_data(home: Path, train_per_maker: int, test_per_maker: int, corruptions: list[str]):
    """(resources, instance, result) after materializing raw_stanford_cars and car_maker_dataset (with its
    blocking checks) in `home`."""
    from car_maker_pipeline.mlflow_store import default_tracking_uri
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
    from car_maker_pipeline.orchestration.resources import (
        MlflowTracking,
        StanfordCarsSource,
        StoreResource,
        VisionLanguageModels,
    )

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
