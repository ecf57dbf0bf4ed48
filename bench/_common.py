"""Helpers shared by the benchmark scripts in bench/ (not part of the package).

Every benchmark reports a ratio against a baseline measured in the same process, with the two
variants interleaved and repeated, because the machine is shared and absolute numbers are noisy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub from a benchmark
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from anywhere imports the working tree's package
    sys.path.insert(0, str(REPO_ROOT))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = os.getloadavg()
    return info


def library_versions(*names: str) -> dict[str, str]:
    import importlib

    versions = {}
    for name in names:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            versions[name] = "not installed"
    return versions


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table, readable in a terminal too."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(path: Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def quiet_libraries() -> None:
    """No progress bars or info logs from datasets/transformers: they would bury the tables."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cached_maker_dataset(
    work: Path,
    prefix: str,
    train_per_maker: int,
    test_per_maker: int,
    image_sizes: str = "demo",
    balance: str = "uniform",
    validation_fraction: float | None = None,
):
    """A demo source (6 makers, no corruptions) and its maker dataset, built once under `work` and reused.

    `balance` is `generate_demo_source`'s (uniform: the same count per maker; stanford: real proportions);
    `validation_fraction` the share of train carved off as validation (None: the pipeline's default).
    """
    from car_maker_pipeline.data.dataset_spec import MakerDatasetParams
    from car_maker_pipeline.data.maker_dataset import build_maker_dataset, load_stored_maker_dataset
    from car_maker_pipeline.data.source import materialize_raw
    from car_maker_pipeline.offline.demo_source import MARKER_FILE, generate_demo_source

    sizes = ("" if image_sizes == "demo" else f"-{image_sizes}") + ("" if balance == "uniform" else f"-{balance}")
    source = work / f"{prefix}-source-train{train_per_maker}-test{test_per_maker}-seed0{sizes}"
    if not (source / MARKER_FILE).exists():
        generate_demo_source(
            source,
            train_per_maker=train_per_maker,
            test_per_maker=test_per_maker,
            corruptions=(),
            image_sizes=image_sizes,
            balance=balance,
        )
    carved = "" if validation_fraction is None else f"-validation{validation_fraction:g}"
    out = work / f"{prefix}-maker-dataset-train{train_per_maker}-test{test_per_maker}{sizes}{carved}"
    record = load_stored_maker_dataset(out)
    if record is None:
        params = MakerDatasetParams() if validation_fraction is None else MakerDatasetParams(validation_fraction)
        record = build_maker_dataset(materialize_raw(str(source), work / "home").load(), out, params)
    return record


def save_results(
    out: Path, name: str, machine: dict[str, Any], versions: dict[str, str], started: float, **fields: Any
) -> Path:
    """Write the run's JSON (benchmark name, machine, library versions, the fields, total time) and say where."""
    import time

    payload = {
        "benchmark": name,
        "machine": machine,
        "versions": versions,
        **fields,
        "total_seconds": time.perf_counter() - started,
    }
    path = write_json(out, payload)
    print(f"\nresults: {path}   (total {payload['total_seconds']:.0f}s)")
    return path
