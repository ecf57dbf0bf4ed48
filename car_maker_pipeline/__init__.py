"""car_maker_pipeline: turn small vision-language models into car-maker classifiers with Dagster."""

__version__ = "0.1.0"
