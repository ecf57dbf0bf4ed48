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

| resource set up      | imported by its setup                               |
|----------------------|-----------------------------------------------------|
| models               | torch, torchvision, transformers' LFM2-VL, peft     |
| mlflow_tracking      | mlflow                                              |
"""

import json
import subprocess
import sys

HEAVY = ("datasets", "torch", "transformers", "mlflow", "PIL")


def test_loading_the_definitions_imports_no_data_or_model_library():
    code = (
        "import json, sys; import car_maker_pipeline.definitions as d; assert d.defs;"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


SETUP = [  # (resource, what its setup imports that was not imported before), set up in this order
    ("mlflow_tracking", ["mlflow"]),
    ("models", ["peft", "torch", "torchvision", "transformers.models.lfm2_vl.modeling_lfm2_vl"]),
]
WATCHED = sorted({module for _, modules in SETUP for module in modules})


def test_setting_up_a_resource_imports_what_its_steps_need():
    code = f"""
import json, sys
import dagster as dg
from car_maker_pipeline.definitions import defs
imported = lambda: [m for m in {WATCHED!r} if m in sys.modules]
print(json.dumps(imported()))
for key in sys.argv[1:]:
    before = set(imported())
    with dg.build_resources({{"resource": defs.resources[key]}}):
        print(json.dumps(sorted(set(imported()) - before)))
"""
    keys = [key for key, _ in SETUP]
    out = subprocess.run([sys.executable, "-c", code, *keys], capture_output=True, text=True, check=True).stdout
    loaded = [json.loads(line) for line in out.strip().splitlines()[-len(SETUP) - 1 :]]
    assert loaded[0] == [], "loading the definitions imported a heavy library"
    assert loaded[1:] == [modules for _, modules in SETUP]
