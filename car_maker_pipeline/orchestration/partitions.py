"""Partitions: one per model of the active profile (the demo's tiny models, or the three LFM2-VL sizes)."""

import dagster as dg

from car_maker_pipeline.settings import get_profile

model_partitions = dg.StaticPartitionsDefinition(get_profile().model_keys)
