"""Benchmark: a model step process's start and end, with Python's cyclic garbage collector left as it is vs.
spared the libraries' objects (`machine.heavy_imports` and `machine.settle_exit`).

    python bench/bench_startup.py               # 8 repetitions
    python bench/bench_startup.py --repeats 3

What is measured
----------------
Each repetition starts one fresh process per way, in an order that rotates. Each loads the definitions,
then, timed, sets up the models and MLflow resources as a model step's run does (`dg.build_resources`:
the model libraries, the evaluation and training libraries, MLflow and its SQL store); then it allocates
200,000 small objects (work after the set-up) and exits. The parent reads each process's whole CPU time,
start to exit. The ways:

- `usual`      the collector as Python leaves it (the exit freeze the package registers is taken back)
- `exit`       only `settle_exit`: the heap frozen when the process ends
- `both`       the set-up as the pipeline has it: `heavy_imports` (collector paused, heap frozen after), and
               `settle_exit`

Headline: per way, the median of the per-repetition ratios way / usual, for the timed set-up and for the
whole process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT,
    format_table,
    library_versions,
    machine_info,
    median,
    save_results,
)

CHILD = """
import atexit, contextlib, gc, json, sys, time
import dagster as dg
import car_maker_pipeline.orchestration.resources as resources
from car_maker_pipeline.definitions import defs
way = sys.argv[1]
if way == "usual":
    atexit.unregister(gc.freeze)
if way != "both":
    resources.heavy_imports = contextlib.nullcontext  # the set-up's imports with the collector left as it is
collections = [0]
gc.callbacks.append(lambda phase, info: collections.__setitem__(0, collections[0] + (phase == "start")))
started = time.process_time()
with dg.build_resources({key: defs.resources[key] for key in ("models", "mlflow_tracking")}):
    pass
imports_cpu, imports_collections = time.process_time() - started, collections[0]
work = [[i] for i in range(200_000)]
print(json.dumps({"imports_cpu": imports_cpu, "collections": imports_collections}))
"""
WAYS = ("usual", "exit", "both")


def run_child(way: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, way], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_cpu": process_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()
    started = time.perf_counter()
    machine = machine_info()
    runs: list[dict[str, dict]] = []
    for repeat in range(args.repeats):
        order = WAYS[repeat % len(WAYS) :] + WAYS[: repeat % len(WAYS)]
        runs.append({way: run_child(way) for way in order})
        print(f"repetition {repeat + 1}/{args.repeats}: {runs[-1]}", flush=True)

    rows = []
    for way in WAYS:
        row = [way, median([run[way]["collections"] for run in runs])]
        for key in ("imports_cpu", "process_cpu"):
            row += [
                median([run[way][key] for run in runs]),
                median([run[way][key] / run["usual"][key] for run in runs]),
            ]
        rows.append(row)
    print()
    headers = ["way", "collections in the set-up", "set-up CPU s", "/ usual", "process CPU s", "/ usual"]
    print(format_table(headers, rows))
    versions = library_versions("torch", "transformers", "peft", "trl", "mlflow", "dagster")
    save_results(args.out, "startup", machine, versions, started, runs=runs, table=rows)


if __name__ == "__main__":
    main()
