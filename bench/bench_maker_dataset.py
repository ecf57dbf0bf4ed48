"""Benchmark: building the maker dataset, ours (`build_maker_dataset`) vs. the tutorial's naive way.

    python bench/bench_maker_dataset.py            # ~16k images, like the real Stanford Cars (~16.2k)
    python bench/bench_maker_dataset.py --small    # ~1.2k images, a quick check

What is measured
----------------
A synthetic Stanford-Cars-shaped source (`generate_demo_source`, 6 makers, no corrupted splits) is
generated once and cached under `--work`, then materialized with `materialize_raw` exactly as the
pipeline does (`raw = materialize_raw(...).load()`, memory-mapped Arrow). Three builders turn it into
a saved maker dataset, each timed end to end (decode, convert, map, split, `save_to_disk`):

- ours      `build_maker_dataset(raw, out, MakerDatasetParams())`: one decode per image (readability
            check, RGB conversion and content hash from the same decode), original bytes kept when
            they already are RGB JPEG/PNG, batched map, and by default 2 worker processes on this
            2-core machine (num_proc=None -> min(cores, 4) for splits of >= 4000 rows).
- ours-1p   the same with `MakerDatasetParams(num_proc=1)`: a like-for-like, single-process comparison.
- naive     the tutorial's approach: a per-row `filter` over the decoded `Image` column (datasets decodes
            each image to check `img.format` / `img.mode`), then a per-row `map` that decodes it again to
            `convert("RGB")` for storage (datasets re-encodes the returned PIL image as PNG) and takes the
            first word of the class name as maker; then a stratified 10% validation split of train and
            `save_to_disk`. Single process, as in the tutorial.

Each repetition runs every builder once, in a rotating order; the headline is the median over
repetitions of the per-repetition ratio ours/naive (images per second), so slow phases caused by
other load on the machine hit both sides.

A separate, untimed check counts real image decodes (`PIL.ImageFile.ImageFile.load` calls that
actually decode pixel data) and `PIL.Image.open` calls while ours builds a small subset in-process
(num_proc=1), and asserts decodes == opens == images. The same count is shown for naive (2 per image).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageFile  # noqa: E402
from _common import RESULTS_DIR, format_table, library_versions, machine_info, median, quiet_libraries, save_results  # noqa: E402

from car_maker_pipeline.data.maker_dataset import MakerDatasetParams, build_maker_dataset  # noqa: E402
from car_maker_pipeline.data.source import materialize_raw  # noqa: E402
from car_maker_pipeline.offline.demo_source import DEMO_MAKERS, MARKER_FILE, generate_demo_source  # noqa: E402

NAME = "bench_maker_dataset"
FULL = {"train_per_maker": 1350, "test_per_maker": 1340}  # 6 x 2690 = 16,140 images (real: 16,185)
SMALL = {"train_per_maker": 100, "test_per_maker": 100}  # 1,200 images


# --------------------------------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------------------------------


def cached_source(work: Path, train_per_maker: int, test_per_maker: int) -> tuple[Path, float]:
    """The synthetic source folder, generated on first use; (path, seconds spent generating)."""
    folder = work / f"source-{len(DEMO_MAKERS)}makers-train{train_per_maker}-test{test_per_maker}-seed0"
    if (folder / MARKER_FILE).exists():
        return folder, 0.0
    started = time.perf_counter()
    generate_demo_source(folder, train_per_maker=train_per_maker, test_per_maker=test_per_maker, corruptions=())
    return folder, time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# The tutorial's naive builder
# --------------------------------------------------------------------------------------------------


def naive_build(raw: datasets.DatasetDict, out_dir: Path, validation_fraction: float = 0.1, seed: int = 0) -> dict:
    """Two decodes per image (validity filter, then RGB conversion), maker = first word, save_to_disk."""
    class_names = raw["train"].features["label"].names

    def readable(example) -> bool:
        image = example["image"]  # decoded by datasets: PIL.Image.open + load
        return image is not None and image.format is not None and image.mode is not None

    def convert(example) -> dict:
        image = example["image"]  # decoded by datasets again
        return {"image": image.convert("RGB"), "maker": class_names[example["label"]].split()[0]}

    features = datasets.Features(
        {"image": datasets.Image(), "label": raw["train"].features["label"], "maker": datasets.Value("string")}
    )
    out = {}
    for split, part in raw.items():
        part = part.cast_column("image", datasets.Image(decode=True))
        kept = part.filter(readable, load_from_cache_file=False, desc=f"naive: check {split}")
        out[split] = kept.map(convert, features=features, load_from_cache_file=False, desc=f"naive: convert {split}")
    train = out["train"].class_encode_column("maker")
    carved = train.train_test_split(test_size=validation_fraction, stratify_by_column="maker", seed=seed)
    result = datasets.DatasetDict(
        {"train": carved["train"], "validation": carved["test"], **{k: v for k, v in out.items() if k != "train"}}
    )
    result.save_to_disk(str(out_dir))
    return {
        "makers": sorted(set(train.features["maker"].names)),
        "rows_per_split": {k: v.num_rows for k, v in result.items()},
    }


def ours_build(raw: datasets.DatasetDict, out_dir: Path, num_proc: int | None) -> dict:
    record = build_maker_dataset(raw, out_dir, MakerDatasetParams(num_proc=num_proc))
    return {"makers": record.makers, "rows_per_split": record.rows_per_split}


# --------------------------------------------------------------------------------------------------
# Decode counting
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_decodes():
    """Count PIL.Image.open calls and ImageFile.load calls that really decode pixels (tile list not yet consumed)."""
    counts = {"open": 0, "decode": 0}
    original_open, original_load = PIL.Image.open, PIL.ImageFile.ImageFile.load

    def counting_open(*args, **kwargs):
        counts["open"] += 1
        return original_open(*args, **kwargs)

    def counting_load(self, *args, **kwargs):
        if self.tile:  # after a full decode the tile list is empty and load() is a no-op
            counts["decode"] += 1
        return original_load(self, *args, **kwargs)

    PIL.Image.open, PIL.ImageFile.ImageFile.load = counting_open, counting_load
    try:
        yield counts
    finally:
        PIL.Image.open, PIL.ImageFile.ImageFile.load = original_open, original_load


def subset(raw: datasets.DatasetDict, rows_per_split: int) -> datasets.DatasetDict:
    return datasets.DatasetDict({k: v.select(range(min(rows_per_split, v.num_rows))) for k, v in raw.items()})


def decode_check(raw: datasets.DatasetDict, work: Path, rows_per_split: int) -> dict:
    small = subset(raw, rows_per_split)
    images = sum(part.num_rows for part in small.values())
    result = {"images": images}
    for name, build in (
        ("ours", lambda out: ours_build(small, out, num_proc=1)),
        ("naive", lambda out: naive_build(small, out)),
    ):
        out = Path(tempfile.mkdtemp(dir=work, prefix=f"decode-check-{name}-"))
        shutil.rmtree(out)
        try:
            with count_decodes() as counts:
                build(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        result[name] = dict(counts)
    return result


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clean_map_caches(raw: datasets.DatasetDict) -> None:
    """Drop the cache-*.arrow files that map/filter wrote next to the stored source (disk space)."""
    for part in raw.values():
        part.cleanup_cache_files()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="~1,200 images instead of ~16,000")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "car_maker_bench",
        help="where the synthetic source (cached across runs) and temporary outputs go",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each builder (median reported)")
    parser.add_argument("--check-rows", type=int, default=100, help="rows per split for the decode-count check")
    parser.add_argument("--no-single-process", action="store_true", help="skip the ours-1p variant (saves time)")
    args = parser.parse_args(argv)

    quiet_libraries()
    sizes = SMALL if args.small else FULL
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()
    machine = machine_info()  # before the work starts: load average of the neighbours

    source, gen_seconds = cached_source(work, **sizes)
    raw_record = materialize_raw(str(source), work / "home")
    raw = raw_record.load()
    images = sum(part.num_rows for part in raw.values())
    print(
        f"source: {source} ({images} images: {raw_record.rows_per_split}); generated in {gen_seconds:.1f}s"
        if gen_seconds
        else f"source: {source} ({images} images, cached)"
    )

    # 1. Decode counts (untimed, in-process).
    check = decode_check(raw, work, args.check_rows)
    clean_map_caches(raw)
    ours_ok = check["ours"]["decode"] == check["images"] and check["ours"]["open"] == check["images"]
    print(f"\ndecode check on {check['images']} images (in-process, num_proc=1):")
    print(
        format_table(
            ["builder", "PIL.Image.open calls", "pixel decodes", "decodes per image"],
            [
                [name, check[name]["open"], check[name]["decode"], check[name]["decode"] / check["images"]]
                for name in ("ours", "naive")
            ],
        )
    )
    assert ours_ok, f"ours should open and decode each image exactly once: {check}"
    print("OK: ours decodes each image exactly once.")

    # 2. Timing, interleaved with a rotating order.
    variants = {"ours": lambda out: ours_build(raw, out, num_proc=None), "naive": lambda out: naive_build(raw, out)}
    if not args.no_single_process:
        variants["ours-1p"] = lambda out: ours_build(raw, out, num_proc=1)
    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    info: dict[str, dict] = {}
    out_root = work / "outputs"
    out_root.mkdir(exist_ok=True)
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            out = out_root / f"{name}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
            t0 = time.perf_counter()
            summary = variants[name](out)
            seconds[name].append(time.perf_counter() - t0)
            summary["output_bytes"] = dir_size(out)
            info[name] = summary
            shutil.rmtree(out, ignore_errors=True)
            clean_map_caches(raw)
            print(
                f"  rep {rep + 1}/{args.repeats} {name:8s} {seconds[name][-1]:7.2f}s  {images / seconds[name][-1]:7.0f} images/s",
                flush=True,
            )

    ips = {n: [images / s for s in seconds[n]] for n in names}
    ratios = {n: [ips[n][r] / ips["naive"][r] for r in range(args.repeats)] for n in names if n != "naive"}
    rows = []
    for n in names:
        rows.append(
            [
                n,
                median(seconds[n]),
                median(ips[n]),
                median(ratios[n]) if n in ratios else 1.0,
                f"{info[n]['output_bytes'] / 1e6:.1f}",
                ", ".join(info[n]["makers"]),
            ]
        )
    print(f"\n{images} images, {args.repeats} repetitions, medians (ratio = median of per-repetition ratios vs naive):")
    print(format_table(["builder", "seconds", "images/s", "ratio vs naive", "output MB", "makers produced"], rows))

    save_results(
        args.out,
        NAME,
        machine,
        library_versions("datasets", "PIL", "pyarrow"),
        started_all,
        mode="small" if args.small else "full",
        source={
            "path": str(source),
            "images": images,
            "rows_per_split": raw_record.rows_per_split,
            **sizes,
            "makers": list(DEMO_MAKERS),
            "generate_seconds": gen_seconds,
        },
        decode_check=check,
        repeats=args.repeats,
        seconds=seconds,
        images_per_second=ips,
        median_images_per_second={n: median(v) for n, v in ips.items()},
        ratio_vs_naive=ratios,
        median_ratio_vs_naive={n: median(v) for n, v in ratios.items()},
        outputs=info,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
