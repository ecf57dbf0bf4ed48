"""Benchmark: every checkpoint scored on one pass over the pictures vs. one pass per checkpoint.

    python bench/bench_checkpoint_scoring.py            # 8 checkpoints, 96 pictures per size mix, 2 repetitions
    python bench/bench_checkpoint_scoring.py --small    # 36 pictures per size mix, 1 repetition (a few minutes)

What is measured
----------------
Model: tiny-s (random weights, `build_tiny_model`) on CPU in fp32, with `--checkpoints` (8) LoRA
adapters of the pipeline's default LoRA shape (`LoraHyperparameters().to_peft_config()`) with random,
non-zero weights, saved as checkpoint folders and attached side by side as `checkpoint_accuracy`
attaches them (`attach_adapters`). Random weights cost exactly what trained ones do, and make each
checkpoint answer differently, so a mix-up between adapters would show in `same_results`.

Data: a demo source (6 makers, no corruptions) at each size mix: `demo` (every picture 128x96) and
`realistic` (Stanford Cars' photo sizes, offline/population.py: thumbnails to 5,616 px); its
validation and test splits, read from the stored maker dataset as the pipeline reads them.

The two sides, each scoring every checkpoint on validation and test:
- per_checkpoint  what `checkpoint_accuracy` did before: for each checkpoint, `set_adapter`, then
                  `evaluate_split` of each split, so every picture is read, decoded and prepared by
                  LFM2-VL's processor once per checkpoint.
- one_pass        what it does now: `evaluate_split_each` of each split with every checkpoint's adapter,
                  so each batch is prepared once and scored by every adapter in turn.
Report writing (parquet, figures) is the same for both and not timed. Both run once untimed first.
Each repetition times both, in alternating order; `speedup` is the median over repetitions of
per_checkpoint seconds / one_pass seconds. `same_results`: every maker's log-probability per image per
checkpoint agrees to 1e-5 between the two sides (and so every answer), at every size mix.

Torch runs with 1 intra-op thread (`--threads`), as the other benchmarks do on this shared machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    cached_maker_dataset,
    format_table,
    library_versions,
    machine_info,
    median,
    quiet_libraries,
    save_results,
)

from car_maker_pipeline.evaluation.checkpoint_scores import attach_adapters  # noqa: E402
from car_maker_pipeline.evaluation.scoring.classifier import (  # noqa: E402
    MakerClassifier,
    evaluate_split,
    evaluate_split_each,
)
from car_maker_pipeline.models.loading import load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402

NAME = "bench_checkpoint_scoring"
SPLITS = ("validation", "test")
TOLERANCE = 1e-5
# (train, test) pictures per maker over 6 makers: validation is 10% of train.
FULL_DATA, SMALL_DATA = (40, 12), (20, 4)  # 24 + 72 = 96 pictures; 12 + 24 = 36 pictures
BATCH_SIZE = 16  # checkpoint_accuracy's default batch size


def random_checkpoints(model_dir: Path, out: Path, count: int) -> dict[int, Path]:
    """`count` adapter folders of the default LoRA shape with random, non-zero weights (cached under `out`)."""
    from peft import get_peft_model

    from car_maker_pipeline.training.config import LoraHyperparameters

    folders = {step: out / f"checkpoint-{step}" for step in range(50, 50 * count + 1, 50)}
    for step, folder in folders.items():
        if (folder / "adapter_model.safetensors").exists():
            continue
        torch.manual_seed(step)
        config = LoraHyperparameters().to_peft_config()
        config.init_lora_weights = False  # B random as well as A: each checkpoint answers differently
        model = get_peft_model(load_model_and_processor(str(model_dir), device="cpu", dtype="float32").model, config)
        model.save_pretrained(folder)
    return folders


def per_checkpoint(classifier: MakerClassifier, data, steps: list[int]) -> dict:
    """Every checkpoint's runs, one checkpoint at a time (the scoring before the one-pass change)."""
    runs = {}
    for step in steps:
        classifier.model.set_adapter(f"step-{step}")
        for split in SPLITS:
            runs[(step, split)] = evaluate_split(classifier, data[split])
    return runs


def one_pass(classifier: MakerClassifier, data, steps: list[int]) -> dict:
    """Every checkpoint's runs, one pass over each split's pictures for all of them."""
    runs = {}
    for split in SPLITS:
        each = evaluate_split_each(classifier, data[split], [f"step-{step}" for step in steps])
        runs.update({(step, split): each[f"step-{step}"] for step in steps})
    return runs


def log_probs(run) -> np.ndarray:
    return np.array(run.predictions.sort_values("index")["log_probs"].tolist())


def agreement(left: dict, right: dict) -> dict:
    """The largest log-probability difference and the number of different answers between two sides."""
    diff = max(float(np.abs(log_probs(left[key]) - log_probs(right[key])).max()) for key in left)
    answers = sum(
        int((left[key].predictions["predicted_maker"] != right[key].predictions["predicted_maker"]).sum())
        for key in left
    )
    return {"max_abs_log_prob_difference": diff, "different_answers": answers}


def measure(model_dir: Path, checkpoints: dict[int, Path], record, repeats: int) -> dict:
    """Both sides on one size mix: times per repetition, speedup, agreement."""
    loaded = load_model_and_processor(str(model_dir), device="cpu", dtype="float32")
    model = attach_adapters(loaded.model, checkpoints)
    classifier = MakerClassifier(model, loaded.processor, list(record.makers), batch_size=BATCH_SIZE)
    data, steps = record.load(), sorted(checkpoints)
    sides = {"per_checkpoint": per_checkpoint, "one_pass": one_pass}
    results = {name: side(classifier, data, steps) for name, side in sides.items()}  # untimed: warm caches
    check = agreement(results["per_checkpoint"], results["one_pass"])
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for repetition in range(repeats):
        order = list(sides) if repetition % 2 == 0 else list(reversed(sides))
        for name in order:
            started = time.perf_counter()
            runs = sides[name](classifier, data, steps)
            seconds[name].append(time.perf_counter() - started)
            worst = agreement(results["per_checkpoint"], runs)
            check = {key: max(check[key], worst[key]) for key in check}
    ratios = [before / after for before, after in zip(seconds["per_checkpoint"], seconds["one_pass"])]
    pictures = sum(data[split].num_rows for split in SPLITS)
    return {
        "pictures": pictures,
        "checkpoints": len(steps),
        "seconds": seconds,
        "images_per_second": {  # pictures x checkpoints scored per second
            name: pictures * len(steps) / median(values) for name, values in seconds.items()
        },
        "speedup": median(ratios),
        "speedup_per_repetition": ratios,
        **check,
        "same_results": check["max_abs_log_prob_difference"] <= TOLERANCE and check["different_answers"] == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="36 pictures per size mix, 1 repetition")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "car_maker_bench",
        help="where the sources, maker datasets, tiny model and adapters are cached",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    parser.add_argument("--checkpoints", type=int, default=8, help="checkpoints scored (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 2; 1 with --small)")
    parser.add_argument(
        "--sizes", nargs="+", choices=("demo", "realistic"), default=["demo", "realistic"], help="size mixes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.small else 2)
    train_per_maker, test_per_maker = SMALL_DATA if args.small else FULL_DATA

    quiet_libraries()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()
    machine = machine_info()
    model_dir = build_tiny_model(work / "tiny-s", "tiny-s")
    checkpoints = random_checkpoints(model_dir, work / "checkpoint-scoring-adapters", args.checkpoints)
    results = {}
    for sizes in args.sizes:
        record = cached_maker_dataset(work, "ckpt", train_per_maker, test_per_maker, image_sizes=sizes)
        print(f"{sizes} sizes: {args.checkpoints} checkpoints of tiny-s, validation and test...", flush=True)
        results[sizes] = measure(model_dir, checkpoints, record, repeats)
        print(f"  speedup {results[sizes]['speedup']:.2f}x, same results: {results[sizes]['same_results']}", flush=True)

    print()
    print(
        format_table(
            ["sizes", "pictures", "checkpoints", "per checkpoint (s)", "one pass (s)", "speedup", "max |dlogp|"],
            [
                [
                    sizes,
                    r["pictures"],
                    r["checkpoints"],
                    median(r["seconds"]["per_checkpoint"]),
                    median(r["seconds"]["one_pass"]),
                    r["speedup"],
                    f"{r['max_abs_log_prob_difference']:.1e}",
                ]
                for sizes, r in results.items()
            ],
        )
    )
    save_results(
        args.out,
        NAME,
        machine,
        library_versions("torch", "transformers", "peft"),
        started_all,
        mode="small" if args.small else "full",
        torch_threads=torch.get_num_threads(),
        batch_size=BATCH_SIZE,
        repeats=repeats,
        speedup={sizes: r["speedup"] for sizes, r in results.items()},
        same_results=all(r["same_results"] for r in results.values()),
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
