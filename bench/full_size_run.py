"""The offline pipeline at the real dataset's size: 49 makers, 8,144 train and 8,041 test pictures, real sizes.

    python bench/full_size_run.py                 # generate, build, evaluate tiny-s on all 8,041 test images
    python bench/full_size_run.py --home DIR      # reuse a CAR_MAKER_HOME (the source is generated once)

    python bench/full_size_run.py --scale 0.25    # a quarter of the rows: peak memory should not shrink much

Each step is a real `dagster asset materialize` command, as a person would run it, against a
throwaway DAGSTER_HOME; the demo source is configured through the `source` resource to the real
dataset's scale (every maker in proportion to its real class count, `demo_train_total` 8,144,
`demo_test_total` 8,041) and the realistic size mixture (offline/population.py), without corrupted
copies. Reported per step: wall seconds and peak memory, two ways:

- `peak_anon_mb`: the largest sum, over the command's whole process tree (sampled from /proc every
  0.2 s), of private anonymous memory (`RssAnon`): what the step itself holds. Bounded means this
  does not grow with the split: compare `--scale 0.25` with the full run.
- `peak_rss_mb`: `/usr/bin/time`'s maximum RSS of one process, which also counts the pages of
  memory-mapped Arrow files the step has read (`RssFile`: the kernel's page cache, dropped under
  memory pressure), so it grows with the files a step reads even when the step holds nothing.
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
    ("baseline_evaluation", "tiny-s|maker", {"ops": {"baseline_evaluation": {"config": {"batch_size": 32}}}}),
]


def run_step(select: str, partition: str | None, config: dict, env: dict) -> dict:
    dagster = str(Path(sys.executable).with_name("dagster"))
    command = [dagster, "asset", "materialize", "-m", "car_maker_pipeline", "--select", select]
    if partition:
        command += ["--partition", partition]
    command += ["--config-json", json.dumps({"resources": {"source": {"config": SOURCE}}, **config})]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *command], cwd=REPO_ROOT, env=env, stdout=log, stderr=log, text=True
        )
        peak = {"anon": 0, "file": 0}
        while process.poll() is None:
            anon, file = tree_memory_kb(process.pid)
            peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
    seconds = time.perf_counter() - started
    if process.returncode != 0 or "RUN_SUCCESS" not in output:
        raise SystemExit(f"{select} failed:\n{output[-4000:]}")
    peak_kb = int(re.findall(r"MAXRSS_KB=(\d+)", output)[-1])
    return {
        "step": select,
        "partition": partition,
        "seconds": seconds,
        "peak_anon_mb": peak["anon"] / 1024,
        "peak_file_mb": peak["file"] / 1024,
        "peak_rss_mb": peak_kb / 1024,
    }


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def tree_memory_kb(root: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in kB summed over `root` and all its descendants, from /proc/<pid>/status."""
    children, todo, anon, file = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        values = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("RssAnon", "RssFile")))
        anon += int(values.get("RssAnon", "0 kB").split()[0])
        file += int(values.get("RssFile", "0 kB").split()[0])
    return anon, file


def main(argv: list[str] | None = None) -> int:
    from car_maker_pipeline.offline.rendering import classes_by_maker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_full_size")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "full_size_run.json")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real dataset's rows")
    parser.add_argument("--only", choices=[select for select, _, _ in STEPS], help="rerun one step (over --home's)")
    args = parser.parse_args(argv)
    SOURCE["demo_makers"] = sorted(classes_by_maker())
    SOURCE["demo_train_total"] = round(SOURCE["demo_train_total"] * args.scale)
    SOURCE["demo_test_total"] = round(SOURCE["demo_test_total"] * args.scale)
    home = (args.home if args.scale == 1.0 else args.home.with_name(f"{args.home.name}-x{args.scale:g}")).resolve()
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
        if args.only and select != args.only:
            continue
        print(f"-> {select}{f' [{partition}]' if partition else ''} ...", flush=True)
        rows.append(run_step(select, partition, config, env))
        row = rows[-1]
        print(
            f"   {row['seconds']:.0f} s, peak anonymous {row['peak_anon_mb']:.0f} MB (tree), "
            f"file-backed {row['peak_file_mb']:.0f} MB, max RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )

    def current(*parts: str) -> dict:  # a step's manifest, {} where --only skipped it
        path = home.joinpath(*parts, "current.json")
        return json.loads(path.read_text()) if path.exists() else {}

    manifest, baseline = current("car_maker_dataset"), current("baseline_evaluation", "tiny-s")
    columns = ["step", "seconds", "peak_anon_mb", "peak_file_mb", "peak_rss_mb"]
    print(format_table(columns, [[r[c] for c in columns] for r in rows]))
    if manifest:
        print(f"rows per split: {manifest['rows_per_split']}; makers: {len(manifest['makers'])}")
    if baseline:
        print(f"tiny-s baseline: {baseline['summary']['accuracy']:.1%} on {baseline['summary']['num_images']} images")
    write_json(
        args.out,
        {
            "benchmark": "full_size_run",
            "machine": machine,
            "scale": args.scale,
            "source": SOURCE,
            "steps": rows,
            "rows_per_split": manifest.get("rows_per_split"),
            "baseline": {key: baseline.get(key) for key in ("summary", "images_per_second", "throughput")},
        },
    )
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
