"""The offline pipeline at the real dataset's size: 49 makers, 8,144 train and 8,041 test pictures, real sizes.

    python bench/full_size_run.py                 # generate, build, evaluate tiny-s on all 8,041 test images
    python bench/full_size_run.py --home DIR      # reuse a CAR_MAKER_HOME (the source is generated once)

Each step is a real `dagster asset materialize` command, as a person would run it, against a
throwaway DAGSTER_HOME; the demo source is configured through the `source` resource to the real
dataset's scale (every maker in proportion to its real class count, `demo_train_total` 8,144,
`demo_test_total` 8,041) and the realistic size mixture (offline/population.py), without corrupted
copies. Reported per step: wall seconds and the peak resident memory of the whole process tree
(`/usr/bin/time`'s maximum RSS of the command and the step processes it waits for), which shows
that no step holds a split decoded in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, RESULTS_DIR, format_table, machine_info, write_json  # noqa: E402

SOURCE = {
    "demo_makers": [],  # filled with all 49 makers in main()
    "demo_balance": "stanford",
    "demo_train_total": 8144,
    "demo_test_total": 8041,
    "demo_image_sizes": "realistic",
    "demo_corruptions": [],
    "demo_train_per_maker": 166,  # names the source folder; the totals above decide the rows
    "demo_test_per_maker": 164,
}
STEPS = [
    ("raw_stanford_cars", None, {}),
    ("car_maker_dataset", None, {}),
    ("baseline_evaluation", "tiny-s", {"ops": {"baseline_evaluation": {"config": {"batch_size": 32}}}}),
]


def run_step(select: str, partition: str | None, config: dict, env: dict) -> dict:
    dagster = str(Path(sys.executable).with_name("dagster"))
    command = [dagster, "asset", "materialize", "-m", "car_maker_pipeline", "--select", select]
    if partition:
        command += ["--partition", partition]
    command += ["--config-json", json.dumps({"resources": {"source": {"config": SOURCE}}, **config})]
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *command], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0 or "RUN_SUCCESS" not in output:
        raise SystemExit(f"{select} failed:\n{output[-4000:]}")
    peak_kb = int(re.findall(r"MAXRSS_KB=(\d+)", output)[-1])
    return {"step": select, "partition": partition, "seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def main(argv: list[str] | None = None) -> int:
    from car_maker_pipeline.offline.rendering import classes_by_maker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_full_size")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "full_size_run.json")
    args = parser.parse_args(argv)
    SOURCE["demo_makers"] = sorted(classes_by_maker())
    home = args.home.resolve()
    dagster_home = Path(tempfile.mkdtemp(prefix="dagster-home-"))
    env = {
        **os.environ,
        "CAR_MAKER_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "CAR_MAKER_PROFILE": "demo",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    machine = machine_info()
    rows = []
    for select, partition, config in STEPS:
        print(f"-> {select}{f' [{partition}]' if partition else ''} ...", flush=True)
        rows.append(run_step(select, partition, config, env))
        print(f"   {rows[-1]['seconds']:.0f} s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    manifest = json.loads((home / "car_maker_dataset" / "current.json").read_text())
    baseline = json.loads((home / "baseline_evaluation" / "tiny-s" / "current.json").read_text())
    print(format_table(["step", "seconds", "peak RSS MB"], [[r["step"], r["seconds"], r["peak_rss_mb"]] for r in rows]))
    print(f"rows per split: {manifest['rows_per_split']}; makers: {len(manifest['makers'])}")
    print(f"tiny-s baseline: {baseline['summary']['accuracy']:.1%} on {baseline['summary']['num_images']} images")
    write_json(
        args.out,
        {
            "benchmark": "full_size_run",
            "machine": machine,
            "source": SOURCE,
            "steps": rows,
            "rows_per_split": manifest["rows_per_split"],
            "baseline": {key: baseline.get(key) for key in ("summary", "images_per_second", "throughput")},
        },
    )
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
