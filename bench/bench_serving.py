"""Benchmark: the registered tiny-s classifier served over HTTP, and the merged export vs. the adapter.

    python bench/bench_serving.py                  # 100 one-image requests, 5 batches of 32, 3 merged/adapter rounds
    python bench/bench_serving.py --small          # 30 requests, 2 batches, 1 round
    python bench/bench_serving.py --home .car_maker_home     # the store `make demo` filled, instead of its own

What is measured
----------------
The model: what the pipeline registers. Unless `--home` points at a store that already has a
`car-maker-tiny-s@champion` and a `merged_model` (as after `make demo`), the script builds its own under
`--work` with the project's assets, in process: the demo source at `make demo`'s size (60 train and 30
test images per maker, 128x96), `baseline_evaluation` (6 images), `lora_checkpoints` (`--train-steps`,
default 40, batch 32, every other LoRA setting at its default: speed does not depend on how well the
adapter was trained), `checkpoint_accuracy` and `merged_model`. A finished store is reused.

Serving: `mlflow models serve -m models:/car-maker-tiny-s@champion --env-manager local` (the README's
command) on a free loopback port, one uvicorn worker, torch limited to `--threads` (default 1) through
OMP_NUM_THREADS. Requests are JSON `dataframe_split` bodies with base64 JPEGs of the demo test split,
sent one at a time by `urllib` from this process. After 5 untimed requests:
- latency: `--requests` (default 100) sequential requests of one image each (cycling through the test
  images), wall time from sending to the parsed response; p50, p95, mean;
- throughput: `--batches` (default 5) requests of 32 images each; images/s per request, median.
For scale, the same one-image call in process (`pyfunc.predict`, no HTTP, no JSON, no base64).

Merged vs adapter: the adapter model (the pyfunc model's PeftModel) and the merged folder loaded as a
plain transformers model, both through `MakerClassifier` (batch 16) and `evaluate_split` on the whole
test split, alternating which goes first; images/s per round and the median of the per-round ratio.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import RESULTS_DIR, format_table, library_versions, machine_info, median, quiet_libraries, save_results

NAME = "bench_serving"
MODEL = "tiny-s"
REGISTERED = f"car-maker-{MODEL}"


def build_store(home: Path, train_steps: int) -> None:
    """The demo-sized pipeline up to merged_model, through the project's assets (skipped when already there)."""
    import dagster as dg

    from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
    from car_maker_pipeline.orchestration.assets.evaluation import checkpoint_accuracy
    from car_maker_pipeline.orchestration.assets.serving import IncomingImages, merged_model
    from car_maker_pipeline.orchestration.assets.training import lora_checkpoints
    from car_maker_pipeline.orchestration.resources import (
        MlflowTracking,
        StanfordCarsSource,
        StoreResource,
        VisionLanguageModels,
    )
    from car_maker_pipeline.store import MERGED_MODEL, PipelineStore

    if PipelineStore(home).manifest_path(MERGED_MODEL, MODEL).exists():
        return
    resources = {
        "store": StoreResource(home=str(home)),
        "source": StanfordCarsSource(profile="demo"),
        "models": VisionLanguageModels(profile="demo"),
        "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}"),
        "incoming_images": IncomingImages(path=str(home / "incoming")),
    }
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([raw_stanford_cars, car_maker_dataset], resources=resources, instance=instance).success
    steps = {"max_steps": train_steps, "checkpoint_every_n_steps": train_steps}
    for asset, config in (
        (baseline_evaluation, {"max_images": 6}),
        (lora_checkpoints, steps),
        (checkpoint_accuracy, {"robustness": False}),
        (merged_model, {}),
    ):
        run_config = {"ops": {asset.key.to_user_string(): {"config": config}}}
        result = dg.materialize(
            [asset], resources=resources, instance=instance, partition_key=f"{MODEL}|maker", run_config=run_config
        )
        assert result.success


def jpeg_test_images(home: Path) -> tuple[list[bytes], list]:
    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.store import PipelineStore

    test = MakerDataset.current(PipelineStore(home)).load()["test"]
    images = list(test["image"])
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    return blobs, test


def body(blobs: list[bytes]) -> bytes:
    rows = [[base64.b64encode(blob).decode()] for blob in blobs]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def post(url: str, payload: bytes) -> tuple[float, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=payload, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer


@contextlib.contextmanager
def scoring_server(home: Path, threads: int, log: Path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "CAR_MAKER_HOME": str(home),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
    }
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{REGISTERED}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scoring server did not start; see {log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ping", timeout=5):
                break
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_serving(home: Path, blobs: list[bytes], requests: int, batches: int, threads: int, work: Path) -> dict:
    with scoring_server(home, threads, work / "serve.log") as url:
        for blob in blobs[:5]:
            post(url, body([blob]))
        latencies = [post(url, body([blobs[i % len(blobs)]]))[0] for i in range(requests)]
        batch_rates = []
        for b in range(batches):
            chunk = [blobs[(b * 32 + i) % len(blobs)] for i in range(32)]
            seconds, answer = post(url, body(chunk))
            assert len(answer["predictions"]) == 32
            batch_rates.append(32 / seconds)
    return {
        "requests": requests,
        "latency_p50_ms": 1000 * percentile(latencies, 50),
        "latency_p95_ms": 1000 * percentile(latencies, 95),
        "latency_mean_ms": 1000 * statistics.fmean(latencies),
        "batch32_images_per_second": median(batch_rates),
        "batch32_rates": batch_rates,
        "latencies_s": latencies,
    }


def measure_in_process(home: Path, blobs: list[bytes], requests: int) -> tuple[dict, object]:
    import pandas as pd

    from car_maker_pipeline.recording.registry import champion_version, load_version

    uri = f"sqlite:///{home / 'mlflow.db'}"
    version = champion_version(uri, MODEL)
    model = load_version(uri, version.name, str(version.version))
    for blob in blobs[:5]:
        model.predict(pd.DataFrame({"image": [blob]}))
    times = []
    for i in range(requests):
        started = time.perf_counter()
        model.predict(pd.DataFrame({"image": [blobs[i % len(blobs)]]}))
        times.append(time.perf_counter() - started)
    stats = {"p50_ms": 1000 * percentile(times, 50), "p95_ms": 1000 * percentile(times, 95)}
    return stats, model


def measure_merged_vs_adapter(home: Path, pyfunc_model, test, rounds: int) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
    from car_maker_pipeline.store import MERGED_MODEL, PipelineStore

    adapter = pyfunc_model.unwrap_python_model().predictor.classifier
    folder = PipelineStore(home).read_manifest(MERGED_MODEL, MODEL)["path"]
    merged = MakerClassifier(
        AutoModelForImageTextToText.from_pretrained(folder).eval(),
        AutoProcessor.from_pretrained(folder),
        adapter.makers,
        prompt=adapter.prompt,
        batch_size=16,
        budget=adapter.budget,
    )
    adapter.batch_size = 16
    rates = {"adapter": [], "merged": []}
    same = True
    for r in range(rounds):
        order = [("adapter", adapter), ("merged", merged)][:: 1 if r % 2 == 0 else -1]
        runs = {label: evaluate_split(classifier, test) for label, classifier in order}
        for label, result in runs.items():
            rates[label].append(result.images_per_second)
        same &= list(runs["adapter"].predictions["predicted_maker"]) == list(
            runs["merged"].predictions["predicted_maker"]
        )
    ratios = [m / a for m, a in zip(rates["merged"], rates["adapter"])]
    return {
        "images": test.num_rows,
        "adapter_images_per_second": median(rates["adapter"]),
        "merged_images_per_second": median(rates["merged"]),
        "merged_over_adapter": median(ratios),
        "rates": rates,
        "same_answers": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="30 requests, 2 batches of 32, 1 merged/adapter round")
    parser.add_argument(
        "--home", type=Path, help="a store with car-maker-tiny-s@champion and merged_model (make demo's)"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench" / "serving")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    parser.add_argument("--requests", type=int, default=None, help="one-image requests (default 100; 30 with --small)")
    parser.add_argument("--batches", type=int, default=None, help="32-image requests (default 5; 2 with --small)")
    parser.add_argument("--rounds", type=int, default=None, help="merged/adapter rounds (default 3; 1 with --small)")
    parser.add_argument("--train-steps", type=int, default=40, help="LoRA steps when building the store (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and here (default 1; 0: torch's)")
    args = parser.parse_args(argv)
    requests = args.requests or (30 if args.small else 100)
    batches = args.batches or (2 if args.small else 5)
    rounds = args.rounds or (1 if args.small else 3)
    started = time.perf_counter()
    machine = machine_info()
    quiet_libraries()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    home = (args.home or args.work / "home").resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.home is None:
        print(f"building the demo-sized store in {home} (reused when present)...", flush=True)
        build_store(home, args.train_steps)
    blobs, test = jpeg_test_images(home)
    print(f"serving {REGISTERED}@champion: {requests} one-image requests, {batches} of 32 images...", flush=True)
    serving = measure_serving(home, blobs, requests, batches, args.threads, args.work)
    in_process, pyfunc_model = measure_in_process(home, blobs, requests)
    print(f"merged vs adapter: {rounds} rounds over {test.num_rows} test images...", flush=True)
    merged = measure_merged_vs_adapter(home, pyfunc_model, test, rounds)
    print()
    print(
        format_table(
            ["measure", "value"],
            [
                ["HTTP latency p50, 1 image (ms)", serving["latency_p50_ms"]],
                ["HTTP latency p95, 1 image (ms)", serving["latency_p95_ms"]],
                ["in-process pyfunc p50, 1 image (ms)", in_process["p50_ms"]],
                ["HTTP batch of 32 (images/s)", serving["batch32_images_per_second"]],
                ["adapter, evaluate_split (images/s)", merged["adapter_images_per_second"]],
                ["merged, evaluate_split (images/s)", merged["merged_images_per_second"]],
                ["merged / adapter (median of rounds)", merged["merged_over_adapter"]],
                ["same answers merged vs adapter", merged["same_answers"]],
            ],
        )
    )
    save_results(
        args.out,
        NAME,
        machine,
        library_versions("torch", "transformers", "peft", "mlflow"),
        started,
        threads=args.threads,
        home=str(home),
        serving=serving,
        in_process=in_process,
        merged_vs_adapter=merged,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
