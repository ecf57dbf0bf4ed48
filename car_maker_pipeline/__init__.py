"""car_maker_pipeline: turn small vision-language models into car-maker classifiers with Dagster.

`dagster ... -m car_maker_pipeline` finds `defs` here. It is loaded lazily so that importing a
plain module (say `car_maker_pipeline.data.makers`) does not import Dagster and every asset. Every
pipeline process imports this first, so it is where the process's thread policy and its exit are set
(machine.py).
"""

from car_maker_pipeline.machine import settle_exit, settle_threads

__version__ = "0.1.0"

settle_threads()  # before torch loads: compute threads that sleep, not spin, while they wait
settle_exit()  # at exit, the heap is left to the OS rather than taken apart object by object


def __getattr__(name: str):
    if name == "defs":
        from car_maker_pipeline.definitions import defs

        return defs
    raise AttributeError(f"module 'car_maker_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return ["__version__", "defs"]
