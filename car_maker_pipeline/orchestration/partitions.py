"""Partitions: one per model of the active profile, and one per (model, checkpoint)."""

import dagster as dg

from car_maker_pipeline.settings import get_profile

model_partitions = dg.StaticPartitionsDefinition(get_profile().model_keys)
