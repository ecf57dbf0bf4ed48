"""GPU readiness: our evaluator vs. the tutorial loop at LFM2-VL-450M's real shape, bf16, SDPA, on CUDA.

    python bench/gpu_real_shape.py                         # 96 realistic-size pictures, batch 16
    python bench/gpu_real_shape.py --images 256 --batch-size 32 --shape 1.6b
    python bench/gpu_real_shape.py --device cpu --images 4 --batch-size 2   # a smoke run without a GPU
    python bench/gpu_real_shape.py --device cpu --images 4 --batch-size 4 --class-task-only

Random weights at the published shape (offline/real_shape.py) with LFM2-VL's real image processor,
so every picture costs what it would with the Hub checkpoint (70 to 2,273 image tokens). Pictures
come from the demo renderer at the realistic size mixture (offline/population.py), JPEG-encoded
(quality 90) and held as stored bytes (`StoredPicture`), so ours reads, decodes and prepares them
as the pipeline does. Ours runs with the evaluator's preparing threads off (`--workers 0`, everything
one step after another) and on (`machine_prepare_workers`, or `--workers N`), and reports the CPU
preparation time alone (every batch prepared, no model), the model's time, and the share of wall time
the model was running (its forward passes end in a host copy, so that time includes the GPU's work),
each with LFM2-VL's image processor on the CPU and on the GPU (`process_on_device`), with the largest
probability difference between the two and how many answers changed. It also times the processor alone
on CPU and GPU, and the class task's 196 answers against the maker task's 49 (evaluation and model time).
The tutorial loop gets decoded pictures, as the tutorial did. The script
needs torch, transformers, tokenizers, pillow, numpy and pandas, not datasets, trl or
dagster (so it runs on a bare GPU machine with this repository and those wheels).

Reported per method: images/s, prompt tokens/s (real tokens, and computed including padding),
the estimated bf16 FLOP rate and its share of the GPU's bf16 dense peak (`--peak-tflops`, default
989, H100/H200 SXM), and which kernels ran: SDPA attention, and whether `causal_conv1d` (LFM2's
short convolution; else transformers' slower reference path) and `flash_attn` were importable
(`pip install 'car_maker_pipeline[gpu]'` installs them). The FLOP estimate is 2 x parameters x
tokens for the language model (tokens computed, padding included) plus 2 x vision parameters x
1,024 patches per tile (LFM2-VL pads every tile to 1,024 patches); attention's quadratic term is
left out, so the share is a lower bound.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, ThroughputStats  # noqa: E402
from car_maker_pipeline.evaluation.scoring.inputs import StoredPicture  # noqa: E402
from car_maker_pipeline.machine import machine_prepare_workers  # noqa: E402
from car_maker_pipeline.model_inputs.prompt import PromptTemplate  # noqa: E402
from car_maker_pipeline.models.loading import load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.demo_source import DEMO_MAKERS  # noqa: E402
from car_maker_pipeline.offline.population import drawing_size, realistic_image_size  # noqa: E402
from car_maker_pipeline.offline.real_shape import build_real_shape_model  # noqa: E402
from car_maker_pipeline.offline.rendering import classes_by_maker, render_car  # noqa: E402


def pictures(count: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        maker = DEMO_MAKERS[index % len(DEMO_MAKERS)]
        _, name = classes_by_maker()[maker][0]
        size = realistic_image_size(rng)
        out.append(render_car(maker, name, rng, drawing_size(size)).resize(size, Image.Resampling.BILINEAR))
    return out


def stored(images: list) -> list[StoredPicture]:
    import io

    out = []
    for image in images:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        out.append(StoredPicture.of({"bytes": buffer.getvalue(), "path": None}))
    return out


def overlapped(
    model, processor, makers, pictures: list, batch_size: int, workers: int, device: str, on_device: bool = False
) -> dict:
    """Ours over stored pictures with `workers` preparing threads (the image processor on the GPU with
    `on_device`): wall, model and preparation times, and every picture's answer probabilities."""
    classifier = MakerClassifier(
        model, processor, makers, batch_size=batch_size, workers=workers, process_on_device=on_device
    )
    classifier.classify_each(pictures[:batch_size], [None], warm_up=True)  # kernels, allocator
    started = time.perf_counter()
    for _ in classifier._prepared_batches(pictures):  # preparation alone: what the CPU side costs
        pass
    prepare_seconds = time.perf_counter() - started
    synchronize(device)
    started = time.perf_counter()
    one = classifier.classify_each(pictures, [None])
    synchronize(device)
    wall = time.perf_counter() - started
    model_seconds = one.model_seconds[None]
    probabilities = np.exp(np.asarray([prediction.log_probs for prediction in one.predictions[None]]))
    return {"workers": workers, "on_device": on_device, "prefetch": classifier.prefetch, "seconds": wall,
            "probabilities": probabilities,
            "images_per_second": len(pictures) / wall, "prepare_seconds_alone": prepare_seconds,
            "model_seconds": model_seconds, "model_busy_share": model_seconds / wall}  # fmt: skip


def processor_seconds(processor, images: list, batch_size: int, device: str | None) -> float:
    """Wall time of LFM2-VL's image processor over `images` in batches, on the CPU (`device` None) or on
    `device` (the processor's own `device` argument: resizing, tiling and normalising there)."""
    extra = {"device": device} if device else {}
    processor.image_processor(images=[[images[0]]], return_tensors="pt", **extra)  # warm-up
    synchronize(device or "cpu")
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        chunk = [[image] for image in images[start : start + batch_size]]
        processor.image_processor(images=chunk, return_tensors="pt", **extra)
    synchronize(device or "cpu")
    return time.perf_counter() - started


def task_scoring_seconds(model, processor, pictures: list, batch_size: int, device: str) -> dict:
    """The class task's 196 answers against the maker task's 49 on the same stored pictures (each task's own
    prompt, the evaluator's default preparation), at this shape: wall and model seconds of each after a
    warm-up, forward passes per picture, and the class/maker ratios."""
    from car_maker_pipeline.data.classes import stanford_cars_class_names
    from car_maker_pipeline.data.makers import makers_for_class_names
    from car_maker_pipeline.data.tasks import CLASS, MAKER

    classes = list(stanford_cars_class_names())
    answers = {MAKER: sorted(set(makers_for_class_names(classes))), CLASS: classes}
    out = {}
    for task, names in answers.items():
        classifier = MakerClassifier(model, processor, names, prompt=task.prompt(names), batch_size=batch_size)
        classifier.classify_each(pictures[:batch_size], [None], warm_up=True)
        synchronize(device)
        started = time.perf_counter()
        stats = ThroughputStats()
        one = classifier.classify_each(pictures, [None], {None: stats})
        synchronize(device)
        out[task.name] = {
            "seconds": time.perf_counter() - started,
            "model_seconds": one.model_seconds[None],
            "passes_per_picture": stats.summary()["forward_passes_per_image"],
        }
    out["class_over_maker"] = out["class"]["seconds"] / out["maker"]["seconds"]
    out["class_over_maker_model"] = out["class"]["model_seconds"] / out["maker"]["model_seconds"]
    return out


def report_class_task(model, processor, jpegs: list, args) -> None:
    cost = task_scoring_seconds(model, processor, jpegs, args.batch_size, args.device)
    maker, klass = cost["maker"], cost["class"]
    print(f"\nclass task (196 answers) against maker task (49), {len(jpegs)} stored pictures: wall maker "
          f"{maker['seconds']:.2f} s, class {klass['seconds']:.2f} s: {cost['class_over_maker']:.2f}x; model alone "
          f"{maker['model_seconds']:.2f} s ({maker['passes_per_picture']:.1f} passes a picture) against "
          f"{klass['model_seconds']:.2f} s ({klass['passes_per_picture']:.1f}): {cost['class_over_maker_model']:.2f}x")  # fmt: skip


def tutorial_loop(model, processor, makers: list[str], images: list) -> int:
    """One picture at a time, free-text greedy generation of up to 64 tokens; returns prompt tokens."""
    text = processor.apply_chat_template(PromptTemplate().messages(makers), add_generation_prompt=True, tokenize=False)
    tokens = 0
    with torch.inference_mode():
        for image in images:
            inputs = processor(images=[[image.convert("RGB")]], text=[text], return_tensors="pt").to(model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            tokens += int(inputs["input_ids"].numel())
            model.generate(**inputs, max_new_tokens=64, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    return tokens


def tiles_of(processor, images: list) -> int:
    return sum(int(processor.image_processor(images=[[im.convert("RGB")]])["pixel_values"].shape[0]) for im in images)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="450m", choices=("450m", "1.6b", "3b"))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tutorial-images", type=int, default=16, help="the tutorial loop is slow: fewer pictures")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--work", type=Path, default=Path("/tmp/car_maker_gpu_bench"))
    parser.add_argument("--workers", type=int, default=None, help="preparing threads (default: the machine's)")
    parser.add_argument("--class-task-only", action="store_true", help="only the class task against the maker task")
    args = parser.parse_args(argv)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"

    kernels = {
        "attention": "sdpa",
        "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }
    model_dir = build_real_shape_model(args.work / f"lfm2-vl-{args.shape}-random", args.shape)
    loaded = load_model_and_processor(str(model_dir), device=args.device, dtype=dtype)
    model, processor = loaded.model, loaded.processor
    kernels["attention"] = getattr(model.config, "_attn_implementation", "sdpa")
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    language = sum(
        p.numel() for n, p in model.named_parameters() if "vision_tower" not in n and "embed_tokens" not in n
    )
    makers = list(DEMO_MAKERS)
    images = pictures(args.images)
    if args.class_task_only:
        report_class_task(model, processor, stored(images), args)
        return 0
    print(
        f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters on {args.device} ({dtype})"
    )
    print(f"kernels: {kernels}")

    classifier = MakerClassifier(model, processor, makers, batch_size=args.batch_size)
    classifier.classify(images[: args.batch_size])  # warm-up: kernels, allocator
    classifier.stats = ThroughputStats()
    synchronize(args.device)
    started = time.perf_counter()
    classifier.classify(images)
    synchronize(args.device)
    ours_seconds = time.perf_counter() - started
    stats = classifier.stats
    # The ceiling (bench_evaluator's `prompt`): the same batches with the prompt's forward pass alone.
    from _evaluator_methods import prompt_pass_only

    ceiling = MakerClassifier(model, processor, makers, batch_size=args.batch_size, decoder=prompt_pass_only)
    ceiling.classify(images[: args.batch_size])
    synchronize(args.device)
    started = time.perf_counter()
    ceiling.classify(images)
    synchronize(args.device)
    ceiling_seconds = time.perf_counter() - started
    vision_flops = 2 * vision * 1024 * tiles_of(processor, images)

    subset = images[: args.tutorial_images]
    tutorial_loop(model, processor, makers, subset[:1])  # warm-up
    synchronize(args.device)
    started = time.perf_counter()
    tutorial_tokens = tutorial_loop(model, processor, makers, subset)
    synchronize(args.device)
    tutorial_seconds = time.perf_counter() - started

    def row(name, n, seconds, real, computed, flops):
        tflops = flops / seconds / 1e12
        share = tflops / args.peak_tflops if args.device.startswith("cuda") else float("nan")
        print(
            f"| {name:<9} | {n:>6} | {n / seconds:>9.2f} | {real / seconds:>13.0f} | {computed / seconds:>16.0f} "
            f"| {tflops:>9.1f} | {share:>8.1%} |"
        )
        return {
            "images": n,
            "seconds": seconds,
            "images_per_second": n / seconds,
            "tflops": tflops,
            "share_of_peak": share,
        }

    print("| method    | images | images/s | real tokens/s | computed tokens/s | TFLOP/s | of peak |")
    print("|-----------|--------|----------|---------------|-------------------|---------|---------|")
    ours = row("ours", len(images), ours_seconds, stats.real_tokens, stats.padded_tokens,
               2 * language * stats.padded_tokens + vision_flops)  # fmt: skip
    tutorial_vision = 2 * vision * 1024 * tiles_of(processor, subset)
    tutorial = row("tutorial", len(subset), tutorial_seconds, tutorial_tokens, tutorial_tokens,
                   2 * language * tutorial_tokens + tutorial_vision)  # fmt: skip
    print(f"ratio ours/tutorial images/s: {ours['images_per_second'] / tutorial['images_per_second']:.1f}x")
    print(f"ours against the prompt-pass ceiling: {ceiling_seconds / ours_seconds:.2f} "
          f"({len(images) / ceiling_seconds:.2f} images/s with the prompt's forward pass alone)")  # fmt: skip
    print(f"evaluator: {stats.summary()}")

    workers = args.workers if args.workers is not None else machine_prepare_workers(args.device.startswith("cuda"))
    jpegs = stored(images)
    print("\nstored JPEGs (read, decoded, prepared as the pipeline does):")
    print(
        "| preparing threads | image processor on | images/s | preparation alone (s) | model (s) | model busy share of wall |"
    )
    print("|---|---|---|---|---|---|")
    runs = []
    for on_device in (False, True) if args.device.startswith("cuda") else (False,):
        for count in dict.fromkeys([0, max(1, workers)]):
            run = overlapped(model, processor, makers, jpegs, args.batch_size, count, args.device, on_device)
            runs.append(run)
            print(f"| {count} | {args.device if on_device else 'cpu'} | {run['images_per_second']:.2f} | "
                  f"{run['prepare_seconds_alone']:.2f} | {run['model_seconds']:.2f} | {run['model_busy_share']:.1%} |")  # fmt: skip
    if len(runs) > 2:  # the processor on the GPU against on the CPU: the same answers?
        cpu, gpu = runs[0]["probabilities"], runs[-1]["probabilities"]
        changed = int((cpu.argmax(axis=1) != gpu.argmax(axis=1)).sum())
        print(f"processor on {args.device} vs cpu: max probability difference {np.abs(cpu - gpu).max():.2e}, "
              f"{changed} of {len(cpu)} answers changed")  # fmt: skip
    decoded = [image.convert("RGB") for image in images]
    if args.device.startswith("cuda"):
        on_cpu = processor_seconds(processor, decoded, args.batch_size, None)
        on_gpu = processor_seconds(processor, decoded, args.batch_size, args.device)
        print(f"\nimage processor over {len(decoded)} pictures: CPU {on_cpu:.2f} s ({1000 * on_cpu / len(decoded):.1f} ms "
              f"a picture), {args.device} {on_gpu:.2f} s ({1000 * on_gpu / len(decoded):.1f} ms): {on_cpu / on_gpu:.1f}x")  # fmt: skip
    report_class_task(model, processor, jpegs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
