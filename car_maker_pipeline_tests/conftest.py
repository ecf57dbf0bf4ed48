"""Shared fixtures: a small generated source, its maker dataset and a tiny LFM2-VL model.

Everything is built once per session under pytest's temporary folder; no test touches the network
(HF_HUB_OFFLINE is forced) or the developer's own CAR_MAKER_HOME, DAGSTER_HOME or MLflow store.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under pytest-xdist each worker's torch (and every process it starts) computes on one thread: two
    workers with two threads each on two cores would spend their time waiting for each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
    _use_the_build_cache(config)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collecting imports the whole stack (torch, transformers, Dagster, MLflow): millions of objects, none
    garbage, that the cyclic collector would walk again and again while they load; so it is paused. What
    collection built lives as long as the session: frozen after it, it is left out of the collections the
    tests' own garbage sets off (a full one walks it in a quarter of a second). What a test makes is
    collected as before. (Under xdist the controller collects nothing; its collector is back on at once.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


def pytest_collection_modifyitems(config, items):
    """`make test` runs `--dist loadscope`: a test file's module-level tests stay on one worker (its module
    fixtures are built once), and each test class is a unit of its own, so a few long tests sit in classes
    to run beside their neighbours. The longest units start first, so no worker is left with one at the end."""
    rank = {scope: position for position, scope in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("[")[0].rsplit("::", 1)[0], len(rank)))


# Units of several minutes each on 2 cores (see `make test`'s slowest durations), longest first.
LONGEST_FIRST = [
    "car_maker_pipeline_tests/test_faults.py::TestSeed0",  # builds the fault tests' shared reference run
    "car_maker_pipeline_tests/test_web_ui.py",
    "car_maker_pipeline_tests/test_faults.py::TestSeed1",
    "car_maker_pipeline_tests/test_cli_end_to_end.py",
    "car_maker_pipeline_tests/test_faults.py::TestSeed2",
    "car_maker_pipeline_tests/test_mlflow_outage.py",
    "car_maker_pipeline_tests/test_postgres.py",
    "car_maker_pipeline_tests/test_lora_training.py",
    "car_maker_pipeline_tests/test_registry_integrity.py",
    "car_maker_pipeline_tests/test_serving.py",
    "car_maker_pipeline_tests/test_distributed_training.py",
    "car_maker_pipeline_tests/test_parallel_runs.py",
    "car_maker_pipeline_tests/test_train_further.py",
]


def _use_the_build_cache(config):
    """Every demo source, tiny model and empty MLflow store the tests make, in-process or in `dagster`
    subprocesses, is built once per key and copied into each home (CAR_MAKER_CACHE). The cache lives in
    pytest's own cache folder, so a second run reuses it; `-p no:cacheprovider` gives each run its own."""
    from car_maker_pipeline.settings import CACHE_ENV

    if CACHE_ENV in os.environ:
        return
    if config.pluginmanager.has_plugin("cacheprovider") and getattr(config, "cache", None) is not None:
        folder = config.cache.mkdir("car_maker_cache")
    else:
        import tempfile

        folder = tempfile.mkdtemp(prefix="car_maker_cache-")
    os.environ[CACHE_ENV] = str(folder)


@pytest.fixture(autouse=True)
def _isolated_stores(tmp_path, monkeypatch):
    """Every test gets its own pipeline home and MLflow store unless it sets one itself."""
    monkeypatch.setenv("CAR_MAKER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CAR_MAKER_PROFILE", raising=False)


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    from car_maker_pipeline.offline.demo_source import generate_demo_source

    return generate_demo_source(
        tmp_path_factory.mktemp("source") / "stanford_cars",
        train_per_maker=14,
        test_per_maker=6,
        corruptions=("contrast",),
        seed=3,
    )


@pytest.fixture(scope="session")
def raw_dataset(demo_source, tmp_path_factory):
    from car_maker_pipeline.data.source import materialize_raw

    return materialize_raw(str(demo_source), tmp_path_factory.mktemp("raw_home"))


@pytest.fixture(scope="session")
def maker_dataset(raw_dataset, tmp_path_factory):
    from car_maker_pipeline.data.maker_dataset import build_maker_dataset

    record = build_maker_dataset(
        raw_dataset.load(), tmp_path_factory.mktemp("makers") / "dataset", source_revision=raw_dataset.revision
    )
    return record


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny-s with seed 0: the very bytes the demo profile's resources build (through the generation cache)."""
    from car_maker_pipeline.offline.tiny_models import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("models"), "tiny-s", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from car_maker_pipeline.models.loading import load_model_and_processor

    return load_model_and_processor(str(tiny_model_dir))
