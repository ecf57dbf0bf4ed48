"""Partitions of the model assets: one per model of the active profile (the demo's tiny models, or the
three LFM2-VL sizes) and task (`maker`, or `class`: make, model and year; data/tasks.py).

Dagster writes a key as `<model>|<task>` (dimensions in name order), e.g. `tiny-s|maker`: that is what
`dagster asset materialize --partition` takes. Each key's results live in the store under
`Task.partition(model)`: the maker task keeps the bare model folder that stores from before the task
dimension already have, so they need no migration.
"""

import dagster as dg

from car_maker_pipeline.data.tasks import MAKER, TASKS, Task, get_task
from car_maker_pipeline.settings import get_profile

MODEL, TASK = "model", "task"

model_partitions = dg.MultiPartitionsDefinition(
    {
        MODEL: dg.StaticPartitionsDefinition(get_profile().model_keys),
        TASK: dg.StaticPartitionsDefinition(list(TASKS)),
    }
)


def partition_key(model_key: str, task: Task = MAKER) -> dg.MultiPartitionKey:
    """The Dagster partition key of one model and task (its string is `<model>|<task>`)."""
    return dg.MultiPartitionKey({MODEL: model_key, TASK: task.name})


def model_and_task(key: str) -> tuple[str, Task]:
    """The model key and task of a partition key (a MultiPartitionKey, or its `<model>|<task>` string)."""
    dimensions = model_partitions.get_partition_key_from_str(str(key)).keys_by_dimension
    return dimensions[MODEL], get_task(dimensions[TASK])
