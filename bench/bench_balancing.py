"""Experiment: maker-balanced sampling and light augmentation vs. natural sampling, on unbalanced demo data.

    python bench/bench_balancing.py                      # 4 configurations x 3 seeds, 160 steps each
    python bench/bench_balancing.py --steps 40 --seeds 0   # a quick look (4 runs)
    python bench/bench_balancing.py --fresh              # retrain instead of reusing finished runs under --work

What is compared
----------------
Training data: the demo profile's source as it was when these figures were taken, 6 makers at Stanford
Cars' real proportions (`demo_balance: stanford`, offline/population.py), 60 train images per maker on average: 324 train
rows after the validation split, from 145 BMW down to 11 AM General. The test split is drawn at the
same proportions but larger than the demo's (100 per maker on average, so AM General has 21 test
pictures per seed instead of 6); the train split is the demo's own, image for image.

Four configurations of `LoraHyperparameters`, every other field at its default (tiny-s, batch 32,
learning rate 5e-3, Liquid's LoRA targets), the same number of optimizer steps (`--steps`) each:

- natural                `sampling="natural"`, `augmentation=False` (the defaults)
- natural + augmentation `sampling="natural"`, `augmentation=True`
- balanced               `sampling="balanced"`, `augmentation=False`
- balanced + augmentation `sampling="balanced"`, `augmentation=True`

Each runs with seeds 0, 1 and 2 (the seed sets the adapter's initialisation, the draws and the
augmentation), through `train_lora` (one checkpoint at the end, no validation pass), and its final
adapter is scored on the whole test split by the project's evaluator (`MakerClassifier` +
`evaluate_split`, as `checkpoint_accuracy` scores checkpoints). Reported per configuration:

- macro accuracy: the mean over makers of per-maker recall, averaged over seeds, and per seed;
- the rarest maker's accuracy (fewest training images: AM General), pooled over the seeds' test
  pictures, with its 95% Wilson interval;
- overall accuracy, averaged over seeds (the test split keeps the real proportions, so this is
  dominated by BMW and Mercedes-Benz).

Torch runs with 1 intra-op thread (see bench/README.md). Finished runs are reused from `--work`
unless `--fresh`; their training time is then not measured again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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

from car_maker_pipeline.evaluation.metrics.accuracy import per_maker_table, summarize, wilson_interval  # noqa: E402
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split  # noqa: E402
from car_maker_pipeline.models.loading import load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402
from car_maker_pipeline.training.config import LoraHyperparameters  # noqa: E402
from car_maker_pipeline.training.trainer import train_lora  # noqa: E402

NAME = "bench_balancing"
TRAIN_PER_MAKER, TEST_PER_MAKER = 60, 100  # train: the demo's default then (360 now); test: enough rare-maker pictures
BALANCE = "stanford"
# Where tiny-s has learnt the task but not finished it (natural sampling: macro accuracy ~55% at 150 steps,
# ~67% at 200), and 12 runs fit in about 10 minutes on 2 busy cores (~0.3 s a step with one thread).
STEPS = 160
CONFIGURATIONS = {
    "natural": {"sampling": "natural", "augmentation": False},
    "natural + augmentation": {"sampling": "natural", "augmentation": True},
    "balanced": {"sampling": "balanced", "augmentation": False},
    "balanced + augmentation": {"sampling": "balanced", "augmentation": True},
}


def train_and_score(name: str, seed: int, steps: int, model_dir: Path, data, makers, work: Path, fresh: bool) -> dict:
    config = LoraHyperparameters(
        **CONFIGURATIONS[name], seed=seed, max_steps=steps, checkpoint_every_n_steps=steps, logging_steps=steps
    )
    out = work / f"{name.replace(' + ', '-')}-seed{seed}-steps{steps}"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's own log lines would bury the table
        result = train_lora(model_dir, data["train"], None, makers, out, config)

    from peft import PeftModel

    loaded = load_model_and_processor(str(model_dir), device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(loaded.model, str(result.final_checkpoint)).eval()
    classifier = MakerClassifier(model, loaded.processor, makers, batch_size=32)
    started = time.perf_counter()
    run = evaluate_split(classifier, data["test"])
    table = per_maker_table(run.predictions, makers)
    summary = summarize(run.predictions, makers)
    return {
        "configuration": name,
        "seed": seed,
        "steps": result.global_step,
        "train_seconds": result.train_seconds,  # 0 when a finished run was reused
        "eval_seconds": time.perf_counter() - started,
        "accuracy": summary.accuracy,
        "macro_accuracy": summary.macro_accuracy,
        "per_maker": {
            row.maker: {"images": int(row.images), "correct": int(row.correct)} for row in table.itertuples()
        },
        "final_train_loss": result.train_loss[-1][1] if result.train_loss else float("nan"),
    }


def summarize_configuration(name: str, runs: list[dict], rarest: str) -> dict:
    mine = sorted((r for r in runs if r["configuration"] == name), key=lambda r: r["seed"])
    correct = sum(r["per_maker"][rarest]["correct"] for r in mine)
    images = sum(r["per_maker"][rarest]["images"] for r in mine)
    low, high = wilson_interval(correct, images)
    return {
        "configuration": name,
        "seeds": [r["seed"] for r in mine],
        "macro_accuracy_mean": sum(r["macro_accuracy"] for r in mine) / len(mine),
        "macro_accuracy_per_seed": [r["macro_accuracy"] for r in mine],
        "accuracy_mean": sum(r["accuracy"] for r in mine) / len(mine),
        "accuracy_per_seed": [r["accuracy"] for r in mine],
        "rarest_maker": rarest,
        "rarest_correct": correct,
        "rarest_images": images,
        "rarest_accuracy": correct / images if images else float("nan"),
        "rarest_ci": [low, high],
    }


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (the same for every run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = torch's)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already finished under --work")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    quiet_libraries()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()
    machine = machine_info()
    record = cached_maker_dataset(work, "balancing", TRAIN_PER_MAKER, TEST_PER_MAKER, balance=BALANCE)
    data = record.load()
    makers = list(record.makers)
    train_counts = Counter(data["train"]["maker"])
    rarest = min(makers, key=lambda maker: train_counts[maker])
    model_dir = build_tiny_model(work / "tiny-s", "tiny-s")
    print(
        f"train rows per maker {dict(train_counts)}; test {data['test'].num_rows} images; "
        f"{args.steps} steps x {len(CONFIGURATIONS)} configurations x seeds {args.seeds}; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )

    runs = []
    for seed in args.seeds:
        order = list(CONFIGURATIONS) if seed % 2 == 0 else list(reversed(CONFIGURATIONS))  # spread the load
        for name in order:
            run = train_and_score(name, seed, args.steps, model_dir, data, makers, work / NAME, args.fresh)
            runs.append(run)
            print(
                f"  seed {seed} {name:24s}: macro {percent(run['macro_accuracy'])}, overall "
                f"{percent(run['accuracy'])}, {rarest} {run['per_maker'][rarest]['correct']}/"
                f"{run['per_maker'][rarest]['images']}  (train {run['train_seconds']:.0f}s)",
                flush=True,
            )

    summaries = [summarize_configuration(name, runs, rarest) for name in CONFIGURATIONS]
    rows = [
        [
            s["configuration"],
            percent(s["macro_accuracy_mean"]),
            " / ".join(percent(v) for v in s["macro_accuracy_per_seed"]),
            f"{percent(s['rarest_accuracy'])} ({s['rarest_correct']}/{s['rarest_images']}) "
            f"[{percent(s['rarest_ci'][0])}, {percent(s['rarest_ci'][1])}]",
            percent(s["accuracy_mean"]),
        ]
        for s in summaries
    ]
    print(f"\ntiny-s, {args.steps} steps, seeds {args.seeds}, test split {data['test'].num_rows} images:")
    print(
        format_table(
            [
                "configuration",
                "macro accuracy (mean)",
                "macro per seed",
                f"{rarest} accuracy, pooled [95% Wilson]",
                "overall accuracy (mean)",
            ],
            rows,
        )
    )
    save_results(
        args.out,
        NAME,
        machine,
        library_versions("torch", "transformers", "peft", "trl", "datasets"),
        started_all,
        torch_threads=torch.get_num_threads(),
        model="tiny-s",
        steps=args.steps,
        seeds=args.seeds,
        balance=BALANCE,
        train_rows_per_maker=dict(train_counts),
        test_rows_per_maker=dict(Counter(data["test"]["maker"])),
        configurations=CONFIGURATIONS,
        summaries=summaries,
        runs=runs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
