"""Benchmark: the demo's training step alone vs. beside a `nice -n 19` CPU load, per torch thread policy.

    python bench/bench_neighbour_load.py           # 320 samples (10 steps of 32), 2 repetitions
    python bench/bench_neighbour_load.py --small   # 128 samples, 1 repetition

What is measured
----------------
The workload is the demo's training step: `build_trainer` + `trainer.train()` on tiny-s at the demo's
LoRA settings (batch 32, `LoraHyperparameters` defaults, one checkpoint at the end), on a demo source's
train split (bench_training's `train_once`, timed from `on_train_begin` to the last `on_step_end`).
Each run is a fresh process (`--child`), so its OpenMP runtime reads the environment it is given
before torch loads, as a pipeline process does.

The neighbour: one `nice -n 19` busy loop per usable core, started before the run and stopped after.

Thread policies (environment given to the process):
- torch-default  what the pipeline did before: torch's defaults (one intra-op thread per core, the
                 OpenMP runtime's default wait policy, which spins before it sleeps)
- passive        the pipeline's choice (`car_maker_pipeline.machine.THREAD_ENVIRONMENT`, set before
                 torch loads in every pipeline process): OMP_WAIT_POLICY=PASSIVE, threads per core
- one-thread     OMP_WAIT_POLICY=PASSIVE and one intra-op thread

Per policy: median seconds alone and beside the load, user CPU seconds, and `slowdown`, the median
over repetitions of beside / alone (goal: at most 1.3). Policies and the two conditions alternate.
Other people's jobs on a shared machine are there in both conditions; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, cached_maker_dataset, format_table, machine_info, median, save_results  # noqa: E402

NAME = "bench_neighbour_load"
TRAIN_PER_MAKER, TEST_PER_MAKER = 60, 34  # bench_evaluator's demo source: 324 train rows
POLICIES = {
    "torch-default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def child(arguments: dict) -> None:
    """One training run in this process; prints its timings as JSON on the last line."""
    # isort: off
    import torch  # first: the OpenMP runtime reads the environment this process was given

    # isort: on
    import datasets
    from _common import quiet_libraries
    from bench_training import train_once

    quiet_libraries()
    record = cached_maker_dataset(Path(arguments["work"]), "eval", TRAIN_PER_MAKER, TEST_PER_MAKER)
    data = record.load()
    samples = arguments["samples"]
    train = datasets.concatenate_datasets([data["train"]] * (samples // data["train"].num_rows + 1))
    train = train.select(range(samples))
    before = resource.getrusage(resource.RUSAGE_SELF)
    run = train_once(
        "ours", Path(arguments["model_dir"]), train, None, list(record.makers), samples, Path(arguments["out"]),
        arguments["learning_rate"], None,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_SELF)
    run.update(
        user_cpu_seconds=after.ru_utime - before.ru_utime,
        system_cpu_seconds=after.ru_stime - before.ru_stime,
        torch_threads=torch.get_num_threads(),
    )
    print(json.dumps(run))


def busy_neighbours(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_child(policy: str, arguments: dict, neighbours: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    env.update(POLICIES[policy])
    load = busy_neighbours(neighbours)
    try:
        time.sleep(0.5 if load else 0)  # the neighbours running before the run starts
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(arguments)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        for process in load:
            process.kill()
            process.wait()
    if done.returncode != 0:
        raise SystemExit(f"the {policy} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="128 samples, 1 repetition")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=None, help="training samples per run (default 320)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions (default 2; 1 with --small)")
    parser.add_argument("--policies", nargs="+", choices=tuple(POLICIES), default=list(POLICIES))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    from _common import quiet_libraries

    from car_maker_pipeline.machine import usable_cpus
    from car_maker_pipeline.offline.tiny_models import build_tiny_model
    from car_maker_pipeline.training.config import LoraHyperparameters

    quiet_libraries()
    samples = args.samples or (128 if args.small else 320)
    samples -= samples % 32
    repeats = args.repeats or (1 if args.small else 2)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()
    machine = machine_info()
    cached_maker_dataset(work, "eval", TRAIN_PER_MAKER, TEST_PER_MAKER)  # built here, not timed in a child
    arguments = {
        "work": str(work),
        "model_dir": str(build_tiny_model(work / "tiny-s", "tiny-s")),
        "out": str(work / "neighbour-runs"),
        "samples": samples,
        "learning_rate": LoraHyperparameters().learning_rate,
    }
    neighbours = usable_cpus()
    runs: dict[str, dict[str, list[dict]]] = {p: {"alone": [], "beside": []} for p in args.policies}
    for repetition in range(repeats):
        for policy in args.policies if repetition % 2 == 0 else reversed(args.policies):
            for condition in ("alone", "beside") if repetition % 2 == 0 else ("beside", "alone"):
                run = run_child(policy, arguments, neighbours if condition == "beside" else 0)
                runs[policy][condition].append(run)
                print(f"  rep {repetition} {policy:13s} {condition:6s}: {run['seconds']:.1f}s, "
                      f"user CPU {run['user_cpu_seconds']:.1f}s", flush=True)  # fmt: skip
    summary = {}
    for policy, by in runs.items():
        ratios = [b["seconds"] / a["seconds"] for a, b in zip(by["alone"], by["beside"])]
        summary[policy] = {
            "torch_threads": by["alone"][0]["torch_threads"],
            "alone_seconds": median([r["seconds"] for r in by["alone"]]),
            "beside_seconds": median([r["seconds"] for r in by["beside"]]),
            "alone_user_cpu_seconds": median([r["user_cpu_seconds"] for r in by["alone"]]),
            "beside_user_cpu_seconds": median([r["user_cpu_seconds"] for r in by["beside"]]),
            "slowdown": median(ratios),
            "slowdown_per_repetition": ratios,
        }
    print()
    print(
        format_table(
            ["policy", "threads", "alone (s)", "beside nice-19 load (s)", "slowdown", "user CPU alone / beside (s)"],
            [
                [
                    p,
                    s["torch_threads"],
                    s["alone_seconds"],
                    s["beside_seconds"],
                    s["slowdown"],
                    f"{s['alone_user_cpu_seconds']:.0f} / {s['beside_user_cpu_seconds']:.0f}",
                ]
                for p, s in summary.items()
            ],  # fmt: skip
        )
    )
    save_results(
        args.out, NAME, machine, {}, started_all, samples=samples, repeats=repeats, neighbours=neighbours,
        policies={p: POLICIES[p] for p in args.policies}, summary=summary, runs=runs,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
