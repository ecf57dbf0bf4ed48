"""Benchmark: our constrained, batched `MakerClassifier` vs. the tutorial's free-text, one-image-at-a-time loop.

    python bench/bench_evaluator.py                    # base tiny-s model, plus a short LoRA run if possible
    python bench/bench_evaluator.py --small            # 64 images, 2 repetitions, one 20-step LoRA run
    python bench/bench_evaluator.py --adapter PATH     # also evaluate this PEFT adapter dir on top of tiny-s
    python bench/bench_evaluator.py --no-train         # skip the LoRA training run
    python bench/bench_evaluator.py --sizes realistic --no-train     # photos sized like Stanford Cars'
    python bench/bench_evaluator.py --model-shape 450m --sizes realistic   # LFM2-VL-450M shape, random weights
    python bench/bench_evaluator.py --input-pipeline --sizes realistic  # batches prepared in 0/1/2 threads

What is measured
----------------
Model: the random-weight tiny LFM2-VL `build_tiny_model(dir, "tiny-s")` on CPU (fp32,
`load_model_and_processor(..., device="cpu")`). Data: a synthetic demo source (6 makers,
34 test images per maker, no corruptions) built with `build_maker_dataset`; the first 200 images of
its test split, decoded into PIL images once, before any timing (so decoding is not timed for
either method). Both methods use the same prompt (`PromptTemplate()`, the makers listed in it).

- ours   `MakerClassifier(model, processor, makers, batch_size=32).classify(images)`: left-padded
         batches of 32, decoding constrained to a trie of the makers' answer tokens, so it stops after
         the longest maker answer and every answer is a valid maker.
- greedy ours with greedy trie decoding (`evaluation/scoring/answers.py` `decode`: a forward pass only where
         the trie branches) instead of scoring every maker's whole answer: what the evaluator did before
         it gave probabilities over every maker. `same_answer_greedy` says how often the most probable
         maker (ours) is the greedy answer; the ratio ours/greedy is what the full distribution costs.
- before the evaluator before forced-token skipping and cost-sorted batching (`evaluation/scoring/reference.py`):
         the same trie through `model.generate` (one forward pass per answer token), batches of 32 in
         input order. Same answers as ours by construction (checked: `same_answer_before`).
- prompt the ceiling: ours with only the prompt's forward pass (processor, vision encoder, prompt;
         no answer is chosen). Every evaluator that shows the model this prompt pays at least this, so
         prompt/naive bounds what any evaluator can reach against the tutorial loop on this machine.
- naive  the tutorial: one image at a time, chat template + processor, `model.generate(max_new_tokens=64,
         do_sample=False)` free text, decoded with `skip_special_tokens=True`; correct when
         `answer.strip().lower() == true_maker.lower()`; "invalid" when the stripped answer is not
         (case-insensitively) one of the makers.

Torch runs with 1 intra-op thread by default (`--threads`): on this shared 2-core machine, with
another CPU-heavy process running, 2 OpenMP threads made both methods 20-50x slower (spin-waiting
on an oversubscribed core), which would measure the neighbours, not the evaluator.

Both get one untimed warm-up batch (32 images for ours, 32 single-image calls for naive) first. Each
repetition then times both over the same images in alternating order; the headline ratio is the
median over repetitions of (ours images/s) / (naive images/s), computed within each repetition.

Sizes: `--sizes demo` draws every picture at 128x96; `--sizes realistic` uses the demo source's
realistic size mixture (offline/population.py: thumbnails to 5,616 px, wide strips), where batches
mix very different image-token counts. For ours and before the table reports prompt tokens computed
over real (padded/real) and forward passes per image.

Model shape: `--model-shape 450m` builds LFM2-VL-450M's real shape with random weights and LFM2-VL's
real image processor (offline/real_shape.py): 70 to 2,273 image tokens per picture. It is slow on a
CPU, so it defaults to 8 images, 1 repetition, batch 8 and no training.

Input pipeline: `--input-pipeline` instead times `evaluate_split` over the stored test pictures
(decoding and preparation included) with 0, 1 and 2 threads preparing batches ahead of the model
(`bench/_input_pipeline.py`), then full against draft decoding (`draft_decode`: the largest
difference of any maker's probability, answers changed, images/s); nothing else runs.

Adapters: a random-weight model is at chance for ours and never says a valid maker in free text, so
the comparison is repeated on LoRA adapters: `--adapter PATH` (a PEFT adapter dir, loaded with
`peft.PeftModel.from_pretrained` on top of tiny-s), and, unless `--no-train`, a short run of
`car_maker_pipeline.training.trainer.train_lora` on the same source's train split: 80 and 300 steps,
every other setting at its `LoraHyperparameters` default except a single
checkpoint at the end (cached under --work: a finished run is reused, not retrained).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    cached_maker_dataset,
    library_versions,
    machine_info,
    quiet_libraries,
    save_results,
)
from _evaluator_methods import MAX_NEW_TOKENS, compare, load_base, load_with_adapter, print_tables  # noqa: E402
from _input_pipeline import compare_draft, compare_workers, print_workers_table  # noqa: E402

from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier  # noqa: E402
from car_maker_pipeline.offline.real_shape import build_real_shape_model  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402

NAME = "bench_evaluator"
TRAIN_PER_MAKER, TEST_PER_MAKER = 60, 34  # 6 makers -> 360 train (324 + 36 validation), 204 test
BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Optional LoRA training
# --------------------------------------------------------------------------------------------------


def train_adapter(model_dir: Path, record, work: Path, max_steps: int) -> tuple[Path | None, dict]:
    """A short `train_lora` run on the source's train split; (final checkpoint, info) or (None, reason)."""
    try:
        from car_maker_pipeline.training.config import LoraHyperparameters
        from car_maker_pipeline.training.trainer import train_lora
    except ImportError as error:
        return None, {"skipped": f"car_maker_pipeline.training.trainer.train_lora is not importable: {error}"}
    data = record.load()
    # One checkpoint (and validation pass) at the end instead of every 20 steps: less time spent saving.
    config = LoraHyperparameters(max_steps=max_steps, checkpoint_every_n_steps=max_steps)
    out = work / f"lora-tiny-s-steps{max_steps}-{config.fingerprint()}"  # another config never resumes this run
    started = time.perf_counter()
    try:
        result = train_lora(model_dir, data["train"], data["validation"], record.makers, out, config)
    except Exception as error:  # report, never hide: the benchmark still gives the base-model numbers
        return None, {"skipped": f"train_lora failed: {type(error).__name__}: {error}"}
    return result.final_checkpoint, {
        "output_dir": str(out),
        "final_checkpoint": str(result.final_checkpoint),
        "config": config.to_json(),
        "global_step": result.global_step,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "reused_finished_run": result.train_seconds == 0.0,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "train_images": data["train"].num_rows,
    }


# --------------------------------------------------------------------------------------------------


def padding_at_scale(processor, pictures: int, batch_size: int, sort_window: int, text_tokens: int) -> dict:
    """Prompt tokens computed over real for `pictures` realistic sizes, batched in order vs. sorted.

    No model runs: a row's length is the prompt's text tokens plus its image tokens under
    `processor` (image_token_count, exact for LFM2-VL's processor), so this scales to the whole
    test split in seconds and shows what batching alone wastes.
    """
    import numpy as np

    from car_maker_pipeline.model_inputs.image_tokens import image_token_count
    from car_maker_pipeline.model_inputs.images import padded_size
    from car_maker_pipeline.offline.population import realistic_image_size

    rng = np.random.default_rng(0)
    lengths = [
        text_tokens + image_token_count(processor.image_processor, *padded_size(*realistic_image_size(rng)))
        for _ in range(pictures)
    ]

    def ratio(order: list[int]) -> float:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths)

    window = batch_size * sort_window
    in_order = list(range(pictures))
    sorted_order = [
        i
        for start in range(0, pictures, window)
        for i in sorted(in_order[start : start + window], key=lengths.__getitem__)
    ]
    return {"pictures": pictures, "batch_size": batch_size, "sort_window": sort_window,
            "padded_to_real_in_order": ratio(in_order), "padded_to_real_sorted": ratio(sorted_order),
            "image_tokens_mean": float(np.mean(lengths)) - text_tokens}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="64 images, 2 repetitions, one 20-step LoRA run")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "car_maker_bench",
        help="where the source, maker dataset, tiny model and LoRA runs are cached",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    parser.add_argument(
        "--images", type=int, default=None, help="test images to classify (default 200; 64 with --small)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions per method (default 3; 2 with --small)"
    )
    parser.add_argument(
        "--adapter", type=Path, action="append", default=[], help="PEFT adapter dir to evaluate too (repeatable)"
    )
    parser.add_argument("--no-train", action="store_true", help="do not run a short train_lora")
    parser.add_argument(
        "--train-steps",
        type=int,
        action="append",
        default=None,
        help="LoRA run length in steps, repeatable (default: 80 and 300; 20 with --small); "
        "every other setting is its LoraHyperparameters default",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on this shared 2-core machine 2 threads collapse "
        "20-50x as soon as another process competes for the cores; 0 = torch's default)",
    )
    parser.add_argument("--sizes", choices=("demo", "realistic"), default="demo", help="picture sizes of the source")
    parser.add_argument(
        "--model-shape", choices=("tiny", "450m"), default="tiny", help="tiny-s, or LFM2-VL-450M's shape (random)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {BATCH_SIZE}; 8 with --model-shape 450m")
    parser.add_argument("--input-pipeline", action="store_true", help="only: 0/1/2 threads preparing batches")
    args = parser.parse_args(argv)
    real_shape = args.model_shape == "450m"
    batch_size = args.batch_size or (8 if real_shape else BATCH_SIZE)
    if real_shape:  # minutes per image on a CPU: few images, no training
        args.no_train = True
        args.images = args.images or 8
        args.repeats = args.repeats or 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_images = args.images or (64 if args.small else 200)
    repeats = args.repeats or (2 if args.small else 3)
    train_steps = args.train_steps or ([20] if args.small else [80, 300])

    quiet_libraries()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()
    machine = machine_info()  # before the work starts: load average of the neighbours

    record = cached_maker_dataset(work, "eval", TRAIN_PER_MAKER, TEST_PER_MAKER, image_sizes=args.sizes)
    test = record.load()["test"]
    if test.num_rows < n_images:
        raise SystemExit(f"the test split has only {test.num_rows} images, fewer than --images {n_images}")
    part = test.select(range(n_images))
    images, truth = list(part["image"]), list(part["maker"])
    makers = list(record.makers)
    if real_shape:
        model_dir = build_real_shape_model(work / "lfm2-vl-450m-random", "450m")
    else:
        model_dir = build_tiny_model(work / "tiny-s", "tiny-s")
    model_label = "LFM2-VL-450M shape (random weights)" if real_shape else "tiny-s (random weights)"
    print(
        f"{n_images} test images of {len(makers)} makers ({', '.join(makers)}); model {model_dir}; "
        f"torch threads {torch.get_num_threads()}"
    )

    if args.input_pipeline:
        model, processor = load_base(model_dir)
        pipeline = compare_workers(model, processor, makers, part, repeats, batch_size)
        print_workers_table(args.sizes, pipeline)
        pipeline["draft_decode"] = compare_draft(model, processor, makers, part, repeats, batch_size)
        print(f"draft decode against full: {pipeline['draft_decode']}")
        save_results(
            args.out, NAME, machine, library_versions("torch", "transformers"), started_all, mode="input-pipeline",
            torch_threads=torch.get_num_threads(), sizes=args.sizes, batch_size=batch_size, input_pipeline=pipeline,
        )  # fmt: skip
        return 0
    results = []
    model, processor = load_base(model_dir)
    probe = MakerClassifier(model, processor, makers, batch_size=batch_size)
    text_tokens = len(processor.tokenizer(probe.prompt_text)["input_ids"])
    padding = padding_at_scale(processor, 8041, batch_size, probe.sort_window, text_tokens)
    print(
        f"padding over {padding['pictures']} realistic sizes, batch {batch_size} (no model run): "
        f"padded/real {padding['padded_to_real_in_order']:.2f} in input order, "
        f"{padding['padded_to_real_sorted']:.2f} sorted within windows of {batch_size * probe.sort_window}",
        flush=True,
    )
    results.append(compare(model_label, model, processor, makers, images, truth, repeats, batch_size))
    del model

    adapters: list[tuple[str, Path]] = [(f"tiny-s + adapter {p}", p) for p in args.adapter]
    training: dict = {"skipped": "--no-train"} if args.no_train else {}
    for steps in [] if args.no_train else train_steps:
        print(
            f"training a {steps}-step LoRA adapter (train_lora, LoraHyperparameters defaults otherwise)...", flush=True
        )
        checkpoint, info = train_adapter(model_dir, record, work, steps)
        training[f"{steps}_steps"] = info
        if checkpoint is not None:
            print(
                f"  trained in {info['train_seconds']:.0f}s"
                + (" (finished run reused)" if info["reused_finished_run"] else "")
                + f"; final val loss {info['val_loss'][-1][1] if info['val_loss'] else float('nan'):.3f}",
                flush=True,
            )
            adapters.append((f"tiny-s + LoRA {steps} steps", checkpoint))
        else:
            print(f"  skipped: {info['skipped']}")
    for label, path in adapters:
        model, processor = load_with_adapter(model_dir, path)
        results.append(compare(label, model, processor, makers, images, truth, repeats, batch_size))
        del model

    print_tables(results, n_images, repeats)

    save_results(
        args.out,
        NAME,
        machine,
        library_versions("torch", "transformers", "peft", "trl", "datasets"),
        started_all,
        mode="small" if args.small else "full",
        torch_threads=torch.get_num_threads(),
        data={"maker_dataset": record.path, "makers": makers, "images": n_images, "split": "test (first N rows)"},
        batch_size=batch_size,
        sizes=args.sizes,
        model_shape=args.model_shape,
        padding_at_scale=padding,
        naive_max_new_tokens=MAX_NEW_TOKENS,
        repeats=repeats,
        training=training,
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
