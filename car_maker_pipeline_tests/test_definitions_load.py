"""Every Dagster process (code server, each run worker, each command) loads the definitions first;
most of them never touch data or a model, so loading must not pay for the heavy libraries.

| library       | imported by loading the definitions |
|---------------|-------------------------------------|
| datasets      | no (the data steps import it)        |
| torch         | no (the model steps import it)       |
| transformers  | no                                  |
| mlflow        | no (tracking is imported in steps)   |
| PIL           | no (figures are made in steps)       |
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
