"""Experiment: 60 labels chosen by the review queue's score vs. 60 chosen at random, on the demo's real proportions.

    python bench/bench_review_queue.py                      # 3 arms x 3 seeds, 160 steps each (~15 min)
    python bench/bench_review_queue.py --steps 40 --seeds 0   # a quick look

What is compared
----------------
Base data: a demo source at Stanford Cars' real maker proportions (`balance: stanford`), 20 train
images per maker on average (so AM General has a handful), and a test split of 100 per maker on
average, cut in two halves by row parity: the *calibration* half chooses each model's threshold for 99%
precision, the *report* half gives every figure below. A pool of about 600 unlabeled images in the same
proportions comes from another demo source (another generator seed; any pixel duplicate of the base
data is removed).

The start model is tiny-s fine-tuned on the base train split (seed 0, `--steps` steps). It scores the
pool; its `unsure` answers (below its 99%-precision threshold from the calibration half) and the
acquisition score of `labeling.review_queue.rank` pick 60 pool images (arm **queue**); 60 others are
drawn uniformly at random (arm **random**, seed 1234). The generator's labels play the reviewer: each
arm's 60 images go into an additions folder as a folder-per-label batch, through `ingest_additions`
and `build_maker_dataset(additions=...)`, the pipeline's own path. Then tiny-s is fine-tuned from the
same base weights, with seeds 0, 1, 2, on: the base train split alone (arm **none**), base + queue,
base + random; each final adapter is scored by the project's evaluator.

Reported per arm: test accuracy (mean over seeds; pooled 95% Wilson interval), macro accuracy, the
rarest maker's accuracy (pooled over seeds, Wilson), coverage at 99% precision (threshold chosen on the
calibration half, applied on the report half, with the answered images' accuracy and its Wilson
interval), and the gain per labeled image over arm none (paired by seed, mean / 60, with a t-interval
over the 3 seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    cached_maker_dataset,
    format_table,
    library_versions,
    machine_info,
    quiet_libraries,
    save_results,
)
from scipy import stats  # noqa: E402

from car_maker_pipeline.data.added_rows import AddedBatch, SourceIndex  # noqa: E402
from car_maker_pipeline.data.maker_dataset import build_maker_dataset  # noqa: E402
from car_maker_pipeline.data.source import materialize_raw  # noqa: E402
from car_maker_pipeline.evaluation.metrics.accuracy import summarize, wilson_interval  # noqa: E402
from car_maker_pipeline.evaluation.metrics.selective import apply_threshold, choose_threshold  # noqa: E402
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split  # noqa: E402
from car_maker_pipeline.labeling.additions import ingest_additions  # noqa: E402
from car_maker_pipeline.labeling.review_queue import rank  # noqa: E402
from car_maker_pipeline.models.loading import load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.demo_source import MARKER_FILE, generate_demo_source  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402
from car_maker_pipeline.serving.batch import PREDICTION_COLUMNS  # noqa: E402
from car_maker_pipeline.training.config import LoraHyperparameters  # noqa: E402
from car_maker_pipeline.training.trainer import train_lora  # noqa: E402

NAME = "bench_review_queue"
TRAIN_PER_MAKER, TEST_PER_MAKER, POOL_PER_MAKER = 20, 100, 100
LABELS, TARGET_PRECISION, STEPS = 60, 0.99, 160
ARMS = ("none", "queue", "random")


def pool_dataset(work: Path):
    """~600 images in the real proportions from another generator seed (train and validation of that source)."""
    source = work / "labeling-pool-source"
    if not (source / MARKER_FILE).exists():
        generate_demo_source(
            source, train_per_maker=POOL_PER_MAKER, test_per_maker=2, corruptions=(), balance="stanford", seed=7
        )
    record = build_maker_dataset(materialize_raw(str(source), work / "pool-home").load(), work / "labeling-pool")
    loaded = record.load()
    return datasets.concatenate_datasets([loaded["train"], loaded["validation"]])


def adapter_classifier(model_dir: Path, adapter: Path, makers):
    from peft import PeftModel

    loaded = load_model_and_processor(str(model_dir), device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    return MakerClassifier(model, loaded.processor, makers, batch_size=32)


def train(train_split, seed: int, steps: int, model_dir: Path, makers, out: Path) -> Path:
    config = LoraHyperparameters(seed=seed, max_steps=steps, checkpoint_every_n_steps=steps, logging_steps=steps)
    with contextlib.redirect_stdout(io.StringIO()):
        return train_lora(model_dir, train_split, None, makers, out, config).final_checkpoint


def score(classifier, test, makers) -> dict:
    """Report-half figures, with the 99% threshold chosen on the calibration half (even rows)."""
    predictions = evaluate_split(classifier, test).predictions
    correct = (predictions["predicted_maker"] == predictions["true_maker"]).to_numpy()
    calibration, report = predictions["index"] % 2 == 0, predictions["index"] % 2 == 1
    chosen = choose_threshold(predictions["score"][calibration], correct[calibration], TARGET_PRECISION)
    applied = apply_threshold(predictions["score"][report], correct[report], chosen.threshold)
    reported = predictions[report]
    summary = summarize(reported, makers)
    per_maker = Counter(reported["true_maker"]), Counter(reported["true_maker"][correct[report]])
    return {
        "accuracy": summary.accuracy,
        "correct": int(correct[report].sum()),
        "images": int(report.sum()),
        "macro_accuracy": summary.macro_accuracy,
        "per_maker": {maker: [per_maker[1][maker], per_maker[0][maker]] for maker in makers},
        "threshold": chosen.threshold,
        "threshold_reached": chosen.reached,
        "coverage": applied["coverage"],
        "answered": applied["answered"],
        "answered_accuracy": applied["accuracy"],
        "answered_ci": [applied["accuracy_ci_low"], applied["accuracy_ci_high"]],
        "calibration_threshold": chosen.threshold,
    }


def queue_choice(classifier, pool, test, makers, train_counts) -> list[int]:
    """The pool rows the review queue puts first: the start model's unsure answers, then the score."""
    calibration = test.select(range(0, test.num_rows, 2))
    calibrated = evaluate_split(classifier, calibration).predictions
    right = (calibrated["predicted_maker"] == calibrated["true_maker"]).to_numpy()
    threshold = choose_threshold(calibrated["score"], right, TARGET_PRECISION).threshold
    scored = evaluate_split(classifier, pool).predictions
    rows = []
    for row in scored.to_dict("records"):
        probabilities = sorted(zip(np.exp(row["log_probs"]), makers), reverse=True)
        rows.append(
            {
                **dict.fromkeys(PREDICTION_COLUMNS),
                "file_name": str(row["index"]),
                "maker": probabilities[0][1],
                "probability": probabilities[0][0],
                "maker_2": probabilities[1][1],
                "probability_2": probabilities[1][0],
                "answer": probabilities[0][1] if row["score"] >= threshold else "unsure",
            }
        )
    ranked = rank(pd.DataFrame(rows, columns=PREDICTION_COLUMNS), train_counts)
    return [int(name) for name in ranked["file_name"][:LABELS]]


def with_additions(raw, index, pool, chosen: list[int], arm: str, work: Path):
    """The base dataset plus the chosen pool images as one batch, through the pipeline's ingestion."""
    folder = work / f"additions-{arm}"
    shutil.rmtree(folder, ignore_errors=True)
    stored = pool.cast_column("image", datasets.Image(decode=False))
    for position in chosen:
        cell, maker = stored[position]["image"], stored[position]["maker"]
        (folder / arm / maker).mkdir(parents=True, exist_ok=True)
        (folder / arm / maker / f"{position}.png").write_bytes(cell["bytes"])
    shutil.rmtree(work / f"batches-{arm}", ignore_errors=True)
    result = ingest_additions(folder, work / f"batches-{arm}", index)
    [batch] = result.batches
    added = AddedBatch(batch.batch_id, batch.split, batch.path, batch.accepted)
    shutil.rmtree(work / f"dataset-{arm}", ignore_errors=True)
    record = build_maker_dataset(raw.load(), work / f"dataset-{arm}", additions=[added])
    return record.load()["train"], batch.accepted, dict(Counter(pool[chosen]["maker"])), result.refused


def t_interval(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [math.nan, math.nan]
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return [float(np.mean(values) - half), float(np.mean(values) + half)]


def report(runs: list[dict], rarest: str, steps: int, seeds: list[int]) -> dict:
    """Print the per-arm table and the paired queue - random differences; the summaries, for the JSON."""
    summaries, rows = {}, []
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        pooled = sum(r["correct"] for r in mine), sum(r["images"] for r in mine)
        rare = sum(r["per_maker"][rarest][0] for r in mine), sum(r["per_maker"][rarest][1] for r in mine)
        answered = sum(r["answered"] for r in mine)
        answered_right = sum(round(r["answered_accuracy"] * r["answered"]) for r in mine if r["answered"])
        gains = {key: [value / LABELS for value in paired(runs, arm, "none", key)] for key in METRICS}
        summaries[arm] = {
            "accuracy_mean": float(np.mean([r["accuracy"] for r in mine])),
            "accuracy_pooled_ci": list(wilson_interval(*pooled)),
            "macro_accuracy_mean": float(np.mean([r["macro_accuracy"] for r in mine])),
            "macro_accuracy_per_seed": [r["macro_accuracy"] for r in mine],
            "rarest_accuracy": rare[0] / rare[1],
            "rarest_ci": list(wilson_interval(*rare)),
            "coverage_mean": float(np.mean([r["coverage"] for r in mine])),
            "coverage_per_seed": [r["coverage"] for r in mine],
            "answered_accuracy_pooled": answered_right / answered if answered else math.nan,
            "answered_ci": list(wilson_interval(answered_right, answered)),
            "gain_per_label": {key: float(np.mean(v)) for key, v in gains.items()},
            "gain_per_label_t95": {key: t_interval(v) for key, v in gains.items()},
        }
        s = summaries[arm]
        gain = (
            ""
            if arm == "none"
            else " / ".join(
                f"{100 * s['gain_per_label'][key]:+.3f} [{100 * s['gain_per_label_t95'][key][0]:+.3f}, "
                f"{100 * s['gain_per_label_t95'][key][1]:+.3f}]"
                for key in ("accuracy", "macro_accuracy")
            )
        )
        rows.append(
            [
                arm,
                f"{s['accuracy_mean']:.1%} [{s['accuracy_pooled_ci'][0]:.1%}, {s['accuracy_pooled_ci'][1]:.1%}]",
                f"{s['macro_accuracy_mean']:.1%}",
                f"{s['rarest_accuracy']:.1%} [{s['rarest_ci'][0]:.1%}, {s['rarest_ci'][1]:.1%}]",
                f"{s['coverage_mean']:.1%} (answered {s['answered_accuracy_pooled']:.1%} "
                f"[{s['answered_ci'][0]:.1%}, {s['answered_ci'][1]:.1%}])",
                gain,
            ]
        )
    print(f"\ntiny-s, {steps} steps, seeds {seeds}; report half of test ({runs[0]['images']} images):")
    headers = ["arm", "accuracy (mean) [pooled 95% Wilson]", "macro (mean)", f"{rarest} pooled [Wilson]"]
    headers += ["coverage @99% (answered acc. [Wilson])", "gain / label vs none, pts: accuracy / macro [t95]"]
    print(format_table(headers, rows))
    differences = {key: paired(runs, "queue", "random", key) for key in METRICS}
    summaries["queue_minus_random"] = {
        key: {"mean": float(np.mean(v)), "t95": t_interval(v), "per_seed": v} for key, v in differences.items()
    }
    print("\nqueue - random, paired by seed (points) [95% t-interval over seeds]:")
    print(
        format_table(
            ["metric", "mean", "t95", "per seed"],
            [
                [
                    key,
                    f"{100 * np.mean(v):+.1f}",
                    "[{:+.1f}, {:+.1f}]".format(*(100 * x for x in t_interval(v))),
                    " / ".join(f"{100 * x:+.1f}" for x in v),
                ]
                for key, v in differences.items()
            ],
        )
    )
    return summaries


METRICS = ("accuracy", "macro_accuracy", "coverage")


def paired(runs: list[dict], arm: str, other: str, key: str) -> list[float]:
    """arm - other for `key`, seed by seed (the seeds both arms ran)."""
    theirs = {r["seed"]: r[key] for r in runs if r["arm"] == other}
    return [r[key] - theirs[r["seed"]] for r in runs if r["arm"] == arm and r["seed"] in theirs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench" / NAME)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-results", type=Path, help="print the tables of a saved results file, train nothing")
    args = parser.parse_args(argv)
    if args.from_results:
        saved = json.loads(args.from_results.read_text())
        counts = saved["base_train_per_maker"]
        report(saved["runs"], min(counts, key=counts.get), saved["steps"], saved["seeds"])
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all, machine = time.perf_counter(), machine_info()

    base = cached_maker_dataset(work, "labeling", TRAIN_PER_MAKER, TEST_PER_MAKER, balance="stanford")
    data, makers = base.load(), list(base.makers)
    raw = materialize_raw(sorted(work.glob("labeling-source-*"))[0].as_posix(), work / "home")
    index = SourceIndex.of(raw.load())
    pool = pool_dataset(work)
    pool = pool.select([i for i, h in enumerate(pool["content_hash"]) if h not in index.hashes])
    train_counts = Counter(data["train"]["maker"])
    rarest = min(makers, key=lambda maker: train_counts[maker])
    model_dir = build_tiny_model(work / "tiny-s", "tiny-s")
    print(f"base train {dict(train_counts)}; pool {pool.num_rows}; test {data['test'].num_rows}", flush=True)

    runs, splits, chosen = [], {"none": data["train"]}, {}
    start = train(data["train"], args.seeds[0], args.steps, model_dir, makers, work / "none-seed0")
    start_classifier = adapter_classifier(model_dir, start, makers)
    chosen["queue"] = queue_choice(start_classifier, pool, data["test"], makers, train_counts)
    chosen["random"] = sorted(np.random.default_rng(1234).choice(pool.num_rows, LABELS, replace=False).tolist())
    arms_info = {}
    for arm in ("queue", "random"):
        splits[arm], accepted, per_maker, refused = with_additions(raw, index, pool, chosen[arm], arm, work)
        arms_info[arm] = {"accepted": accepted, "labels_per_maker": per_maker, "refused": len(refused)}
        print(f"arm {arm}: {accepted} rows accepted, per maker {per_maker}", flush=True)
    for seed in args.seeds:
        for arm in ARMS:
            adapter = start if (arm == "none" and seed == args.seeds[0]) else None
            began = time.perf_counter()
            adapter = adapter or train(splits[arm], seed, args.steps, model_dir, makers, work / f"{arm}-seed{seed}")
            run = {
                "arm": arm,
                "seed": seed,
                **score(adapter_classifier(model_dir, adapter, makers), data["test"], makers),
            }
            run["seconds"] = time.perf_counter() - began
            runs.append(run)
            print(
                f"  seed {seed} {arm:7s}: accuracy {run['accuracy']:.3f}, macro {run['macro_accuracy']:.3f}, "
                f"{rarest} {run['per_maker'][rarest]}, coverage@99% {run['coverage']:.3f}",
                flush=True,
            )

    summaries = report(runs, rarest, args.steps, args.seeds)
    save_results(
        args.out,
        NAME,
        machine,
        library_versions("torch", "transformers", "peft", "trl", "datasets"),
        started_all,
        torch_threads=torch.get_num_threads(),
        steps=args.steps,
        seeds=args.seeds,
        labels=LABELS,
        base_train_per_maker=dict(train_counts),
        pool_rows=pool.num_rows,
        arms=arms_info,
        chosen=chosen,
        summaries=summaries,
        runs=runs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
