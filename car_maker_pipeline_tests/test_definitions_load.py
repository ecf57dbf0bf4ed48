"""Every Dagster process (code server, each run worker, each command) loads the definitions first;
most of them never touch data or a model, so loading must not pay for the heavy libraries.

| library       | imported by loading the definitions |
|---------------|-------------------------------------|
| datasets      | no (the data steps import it)        |
| torch         | no (the model steps import it)       |
| transformers  | no                                  |
| mlflow        | no (tracking is imported in steps)   |
| PIL           | no (figures are made in steps)       |

A run that executes a model step imports them while its resources are set up, which Dagster does
before the run's steps claim their pool slots: the seconds of importing are not spent holding the
`gpu` pool's one slot while other runs queue for it.

| resource set up      | imported by its setup                                                 |
|----------------------|-----------------------------------------------------------------------|
| mlflow_tracking      | mlflow, and its SQL store unless the URI names a tracking server        |
| models               | torch, torchvision, transformers' LFM2-VL, peft, datasets, matplotlib;  |
|                      | TRL too when the run trains or does not say which steps it runs         |
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("datasets", "torch", "transformers", "mlflow", "PIL", "optuna")


def test_loading_the_definitions_imports_no_data_or_model_library():
    code = (
        "import json, sys; import car_maker_pipeline.definitions as d; assert d.defs;"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


SETUP = [  # (resource, what its setup imports that was not imported before), set up in this order
    ("mlflow_tracking at a server", ["mlflow"]),  # the server keeps the store: no SQL store here
    ("mlflow_tracking", ["mlflow.store.tracking.sqlalchemy_store"]),
    (
        "models",  # set up outside a run, which may train
        [
            "datasets",
            "matplotlib.pyplot",
            "peft",
            "torch",
            "torchvision",
            "transformers.models.lfm2_vl.modeling_lfm2_vl",
            "trl",
        ],
    ),
]
WATCHED = sorted({module for _, modules in SETUP for module in modules})


def test_setting_up_a_resource_imports_what_its_steps_need():
    code = f"""
import json, sys
import dagster as dg
from car_maker_pipeline.definitions import defs
from car_maker_pipeline.orchestration.resources import MlflowTracking
resources = {{**defs.resources, "mlflow_tracking at a server": MlflowTracking(tracking_uri="http://127.0.0.1:9")}}
imported = lambda: [m for m in {WATCHED!r} if m in sys.modules]
print(json.dumps(imported()))
for key in sys.argv[1:]:
    before = set(imported())
    with dg.build_resources({{"resource": resources[key]}}):
        print(json.dumps(sorted(set(imported()) - before)))
"""
    keys = [key for key, _ in SETUP]
    out = subprocess.run([sys.executable, "-c", code, *keys], capture_output=True, text=True, check=True).stdout
    loaded = [json.loads(line) for line in out.strip().splitlines()[-len(SETUP) - 1 :]]
    assert loaded[0] == [], "loading the definitions imported a heavy library"
    assert loaded[1:] == [modules for _, modules in SETUP]


STEP_LIBRARIES = [  # (the run's asset selection, its step keys, whether its setup imports TRL)
    (None, None, True),  # a run that does not say which steps it runs may train
    (["baseline_evaluation"], None, False),
    (["checkpoint_accuracy", "merged_model"], None, False),
    (["lora_checkpoints", "checkpoint_accuracy"], None, True),
    (["lora_sweep"], None, True),
    (None, ["baseline_evaluation"], False),  # a job's run (baseline_job): its step keys
    (None, ["lora_checkpoints", "checkpoint_accuracy"], True),
]


@pytest.mark.parametrize(("assets", "step_keys", "trains"), STEP_LIBRARIES)
def test_the_models_setup_imports_the_training_library_only_for_runs_that_may_train(assets, step_keys, trains):
    import dagster as dg

    from car_maker_pipeline.orchestration.resources import EVALUATION_LIBRARIES, TRAINING_LIBRARIES, step_libraries

    run = dg.DagsterRun(
        job_name="__ASSET_JOB",
        asset_selection=frozenset(dg.AssetKey(name) for name in assets) if assets is not None else None,
        step_keys_to_execute=step_keys,
    )
    assert step_libraries(run) == EVALUATION_LIBRARIES + (TRAINING_LIBRARIES if trains else ())
