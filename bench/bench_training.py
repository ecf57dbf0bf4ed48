"""Benchmark: LoRA training throughput of our configuration vs. the tutorial's, same samples, same model.

    python bench/bench_training.py                 # 1,280 training samples per run, 3 repetitions
    python bench/bench_training.py --small         # 128 samples, 2 repetitions (~1 min)
    python bench/bench_training.py --sizes realistic   # realistic photo sizes: ours with vs without grouping
    python bench/bench_training.py --sizes realistic --workers 2   # ours with 0 vs 2 data-loading workers

What is measured
----------------
Both variants run `car_maker_pipeline.training.trainer.build_trainer` (TRL `SFTTrainer` + PEFT LoRA,
loss on the answer tokens only) on the same model, the same training rows in the same order (seed
0), the same learning rate, LoRA targets, r/alpha and optimizer. Only the three knobs the tutorial
set differently change:

- ours      `per_device_train_batch_size=32`, `gradient_accumulation_steps=1`, gradient checkpointing off
            (`LoraHyperparameters`' defaults)
- tutorial  `per_device_train_batch_size=1`, `gradient_accumulation_steps=16`, gradient checkpointing on

Each run trains on the same number of samples (`--samples`, rounded to a multiple of 32 and 16), so
ours takes samples/32 optimizer steps and the tutorial samples/16. The clock runs from the Trainer's
`on_train_begin` to the `on_step_end` of the last step: data loading, collation, forward, backward and
optimizer steps, but neither model loading nor the single checkpoint the Trainer writes at the end.
Afterwards both adapters are scored on the same validation rows (`trainer.evaluate`, untimed), and the
mean training loss of the last logged steps is kept: "loss reached" after the same samples.

Torch runs with 1 intra-op thread by default (see bench/README.md: 2 threads collapse 20-50x on this
shared 2-core machine). The variants alternate, order flipped every repetition; the headline figure is
the median of per-repetition (ours samples/s) / (tutorial samples/s).

`--sizes realistic` trains on the demo source's realistic size mixture (offline/population.py) and
compares ours with `group_by_image_tokens` off (random batches) and on (transformers' length-grouped
sampler over each picture's image tokens): the only difference is which pictures share a batch.

`--workers N` compares ours with `dataloader_num_workers=0` (decoding, RGB, LFM2-VL's processor and
collation in the training process, between steps) against N worker processes preparing batches
ahead of the model (torch's DataLoader, as the Trainer runs it); nothing else changes.

On a CUDA machine the same script runs on the GPU (the Trainer places the model) and also records
peak GPU memory per variant.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
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

from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402
from car_maker_pipeline.training.config import LoraHyperparameters  # noqa: E402
from car_maker_pipeline.training.sft_data import build_sft_dataset  # noqa: E402
from car_maker_pipeline.training.trainer import build_trainer  # noqa: E402

NAME = "bench_training"
TRAIN_PER_MAKER, TEST_PER_MAKER = 240, 10  # 6 makers -> 1,440 train rows (1,296 + 144 validation)

OURS = {
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "dataloader_num_workers": 0,
}
VARIANTS = {
    "ours": OURS,
    "tutorial": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16, "gradient_checkpointing": True},
}
SIZE_VARIANTS = {"ours": OURS, "ours-grouped": {**OURS, "group_by_image_tokens": True}}
WORKER_VARIANTS: dict[str, dict] = {}  # filled by --workers


def _timing_callback():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time from the start of training to the end of the last optimizer step."""

        def __init__(self):
            self.started = self.last_step_end = None

        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.last_step_end = time.perf_counter()

    return StepClock()


def train_once(
    variant: str, model_dir: Path, train, val, makers, samples: int, work: Path, learning_rate: float, bf16: bool | None
) -> dict:
    knobs = {**VARIANTS, **SIZE_VARIANTS, **WORKER_VARIANTS}[variant]
    per_step = knobs["per_device_train_batch_size"] * knobs["gradient_accumulation_steps"]
    steps = samples // per_step
    config = LoraHyperparameters(
        learning_rate=learning_rate,
        max_steps=steps,
        checkpoint_every_n_steps=steps,
        logging_steps=1,
        warmup_steps=0,
        bf16=bf16,
        **knobs,
    )
    out = work / f"run-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    clock = _timing_callback()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer, _ = build_trainer(model_dir, train, None, makers, out, config, callbacks=[clock])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one line per step would bury the table
    trainer.train()
    seconds = clock.last_step_end - clock.started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    tail = max(1, len(losses) // 5)  # the last fifth of the logged steps: "loss reached"
    lengths_from = trainer.processing_class if knobs.get("group_by_image_tokens") else None
    val_sft = build_sft_dataset(val, makers, processor=lengths_from) if val is not None else None
    val_loss = trainer.evaluate(val_sft)["eval_loss"] if val_sft is not None else float("nan")
    shutil.rmtree(out, ignore_errors=True)
    del trainer
    return {
        "variant": variant,
        **knobs,
        "optimizer_steps": steps,
        "samples": steps * per_step,
        "seconds": seconds,
        "samples_per_second": steps * per_step / seconds,
        "final_train_loss": sum(losses[-tail:]) / tail,
        "first_train_loss": losses[0] if losses else float("nan"),
        "val_loss": val_loss,
        "peak_gpu_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="128 samples, 2 repetitions")
    parser.add_argument(
        "--samples", type=int, default=None, help="training samples per run (default 1280; 128 with --small)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="repetitions of each variant (default 3; 2 with --small)"
    )
    parser.add_argument("--model", default="tiny-s", help="tiny demo model to train (tiny-s, tiny-m, tiny-l)")
    parser.add_argument(
        "--learning-rate", type=float, default=LoraHyperparameters.model_fields["learning_rate"].default
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = torch's default)"
    )
    parser.add_argument("--sizes", choices=("demo", "realistic"), default="demo", help="picture sizes of the source")
    parser.add_argument("--workers", type=int, default=None, help="compare 0 with this many data-loading workers")
    args = parser.parse_args(argv)
    variants = SIZE_VARIANTS if args.sizes == "realistic" else VARIANTS
    if args.workers:
        WORKER_VARIANTS.update({"ours": OURS, "ours-workers": {**OURS, "dataloader_num_workers": args.workers}})
        variants = WORKER_VARIANTS
    baseline, other = list(variants)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    samples = args.samples or (128 if args.small else 1280)
    samples -= samples % 32
    if samples < 32:
        raise SystemExit("--samples must be at least 32")
    repeats = args.repeats or (2 if args.small else 3)

    quiet_libraries()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()
    machine = machine_info()

    record = cached_maker_dataset(work, "train", TRAIN_PER_MAKER, TEST_PER_MAKER, image_sizes=args.sizes)
    data = record.load()
    train, val = data["train"], data["validation"]
    if train.num_rows < samples:  # repeat rows so both variants see exactly `samples` samples in one epoch
        train = datasets.concatenate_datasets([train] * (samples // train.num_rows + 1))
    train = train.select(range(samples))
    makers = list(record.makers)
    model_dir = build_tiny_model(work / args.model, args.model)
    print(
        f"{samples} training samples of {len(makers)} makers; model {args.model}; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    runs: list[dict] = []
    ratios = []
    for rep in range(repeats):
        order = [baseline, other] if rep % 2 == 0 else [other, baseline]
        by_variant = {}
        for variant in order:
            result = train_once(variant, model_dir, train, val, makers, samples, work, args.learning_rate, None)
            result["repetition"] = rep
            runs.append(result)
            by_variant[variant] = result
            print(
                f"  rep {rep} {variant:8s}: {result['samples_per_second']:.2f} samples/s, "
                f"train loss {result['first_train_loss']:.3f} -> {result['final_train_loss']:.3f}, "
                f"val loss {result['val_loss']:.3f}",
                flush=True,
            )
        # ours / tutorial at demo sizes; grouped / ungrouped at realistic sizes; N workers / none
        first, second = (
            ("ours-workers", "ours")
            if args.workers
            else ("ours", "tutorial")
            if args.sizes == "demo"
            else ("ours-grouped", "ours")
        )
        ratios.append(by_variant[first]["samples_per_second"] / by_variant[second]["samples_per_second"])

    def med(variant: str, key: str) -> float:
        return median([r[key] for r in runs if r["variant"] == variant])

    rows = [
        [
            v,
            variants[v]["per_device_train_batch_size"],
            variants[v]["gradient_accumulation_steps"],
            variants[v]["gradient_checkpointing"],
            samples // (variants[v]["per_device_train_batch_size"] * variants[v]["gradient_accumulation_steps"]),
            med(v, "samples_per_second"),
            med(v, "final_train_loss"),
            med(v, "val_loss"),
        ]
        for v in variants
    ]
    print(f"\n{samples} samples, {repeats} repetitions, medians:")
    print(
        format_table(
            [
                "variant",
                "batch",
                "grad accum",
                "grad ckpt",
                "optimizer steps",
                "samples/s",
                "final train loss",
                "val loss",
            ],
            rows,
        )
    )
    headline = median(ratios)
    print(
        f"ratio {first}/{second} samples/s "
        f"(median of per-repetition ratios): {headline:.2f}x  "
        f"(each: {', '.join(f'{r:.2f}' for r in ratios)})"
    )

    save_results(
        args.out,
        NAME,
        machine,
        library_versions("torch", "transformers", "peft", "trl", "datasets"),
        started_all,
        torch_threads=torch.get_num_threads(),
        model=args.model,
        samples=samples,
        learning_rate=args.learning_rate,
        validation_rows=val.num_rows,
        variants=variants,
        sizes=args.sizes,
        workers=args.workers,
        runs=runs,
        ratios=ratios,
        median_ratio=headline,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
