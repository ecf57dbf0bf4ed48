"""A process spares its garbage collector the libraries' objects (machine.heavy_imports, machine.settle_exit).

| case                                                   | expected                                                    |
|--------------------------------------------------------|-------------------------------------------------------------|
| a block that loads a module, collector on before it    | no collection inside, collector on after, what exists frozen |
| a block that loads nothing new                         | collector on after, nothing more frozen                      |
| collector off before the block                         | still off after                                              |
| the block raises                                       | the error reaches the caller, collector on, nothing frozen   |
| a fresh process sets the models and MLflow resources up | a tenth of the collections, at most 2 full ones, collector on after, the heap mostly frozen |
| that process ends                                      | its heap frozen before the interpreter's last collections    |
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import uuid

import pytest

from car_maker_pipeline.machine import heavy_imports


@pytest.fixture
def new_module(tmp_path, monkeypatch):
    """The name of a module no one has imported yet, which allocates some tracked objects when it loads."""
    name = f"startup_probe_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("TABLE = [[i] for i in range(20_000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _collections_counted():
    counted = []

    def callback(phase, info):
        if phase == "start":
            counted.append(info["generation"])

    gc.callbacks.append(callback)
    return counted, lambda: gc.callbacks.remove(callback)


def _frozen(obj) -> bool:
    """Whether `obj` (tracked by the collector) sits in the frozen generation: `gc.get_objects()` lists the others.
    (The frozen count itself is no witness: frozen objects that other tests release leave it.)"""
    assert gc.is_tracked(obj)
    return not any(other is obj for other in gc.get_objects())


def test_a_block_that_loads_a_module_runs_no_collection_and_freezes_what_exists(new_module):
    import importlib

    counted, stop = _collections_counted()
    before = [[0]]  # made before the block
    try:
        with heavy_imports():
            assert not gc.isenabled()
            table = importlib.import_module(new_module).TABLE
            extra = [[i] for i in range(20_000)]  # 20,000 more objects: the collector would run ~28 times
            in_block = list(counted)
    finally:
        stop()
    assert in_block == []
    assert gc.isenabled()
    assert _frozen(before) and _frozen(table) and _frozen(extra)
    assert not _frozen([[1]])  # made after the block: collected as usual


def test_a_block_that_loads_nothing_new_freezes_nothing():
    with heavy_imports():
        import json  # noqa: F401, F811 (loaded already: this module imports it)

        made = [[0]]
    assert gc.isenabled()
    assert not _frozen(made)


def test_a_collector_turned_off_before_the_block_stays_off(new_module):
    import importlib

    gc.disable()
    try:
        with heavy_imports():
            importlib.import_module(new_module)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_in_the_block_reaches_the_caller_with_the_collector_back_on(new_module):
    import importlib

    made = []

    def load_then_fail():
        with heavy_imports():
            importlib.import_module(new_module)
            made.append([0])
            raise RuntimeError("model missing")

    with pytest.raises(RuntimeError, match="model missing"):
        load_then_fail()
    assert gc.isenabled()
    assert not _frozen(made[0])


CHILD = """
import atexit, gc, json
# Registered before the package is imported, so it runs after the package's own exit handler.
atexit.register(lambda: print(json.dumps({"frozen_at_exit": gc.get_freeze_count()}), flush=True))
import dagster as dg
from car_maker_pipeline.definitions import defs
counted = []
gc.callbacks.append(lambda phase, info: counted.append(info["generation"]) if phase == "start" else None)
with dg.build_resources({key: defs.resources[key] for key in ("models", "mlflow_tracking")}):
    pass
state = {"collections": len(counted), "full": counted.count(2), "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
         "unfrozen": len(gc.get_objects())}
kept = [[i] for i in range(30_000)]  # made after the set-up: collected as usual until the process ends
state["frozen_before_exit"] = gc.get_freeze_count()
print(json.dumps(state), flush=True)
"""


@pytest.mark.slow
def test_a_model_process_imports_without_collections_and_ends_with_its_heap_frozen():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    state, at_exit = (json.loads(line) for line in out.strip().splitlines()[-2:])
    # With the collector left on: about 1,830 collections, 8 of them full (walking every object loaded so far).
    assert state["collections"] < 400 and state["full"] <= 2, state
    assert state["enabled"], state
    assert state["frozen"] > 10 * state["unfrozen"], state  # a full collection walks a tenth of the heap or less
    assert state["frozen_before_exit"] < state["frozen"] + 1_000, state  # what the step makes is not frozen...
    # ...until the process ends (30,000 more, less a few frozen objects released meanwhile)
    assert at_exit["frozen_at_exit"] >= state["frozen_before_exit"] + 29_000, at_exit
