"""An offline demo source shaped exactly like the Hub dataset `tanganke/stanford_cars`.

Why it exists: the pipeline (and its tests and benchmarks) must run without network access and
without the 4 GB real dataset. `generate_demo_source` writes a folder that the real loading code
reads unchanged with `datasets.load_dataset(str(out_dir))`:

    out_dir/README.md                                  dataset card; YAML declares features and splits
    out_dir/data/train-00000-of-00001.parquet
    out_dir/data/test-00000-of-00001.parquet
    out_dir/data/<corruption>-00000-of-00001.parquet   corrupted copies of test (same rows, same order)

Features are exactly those of the real source: an `image` column of encoded bytes and a `label`
ClassLabel carrying all 196 real Stanford Cars class names, so label ids, class names and the
maker mapping behave as they do on the real data; only classes of the chosen makers get rows.

The images are synthetic side views of cars drawn with PIL. What identifies the maker is deliberately
strong and survives resizing to about 64x64 and, mostly, grayscale: each maker has its own body hue
family, silhouette (roof shape, body height, ground clearance, wheel size) and a distinctive accent
(spare wheel, racing stripe, kidney grille, floating two-tone roof, chrome sill, coach line). Classes of
one maker differ only slightly (hue shift, proportions, a soft top on convertibles), and nuisance
factors the classifier must ignore vary per image: background gradient, position, scale, slight
rotation, facing direction, pixel noise and the file format (mostly JPEG, some PNG, a few grayscale,
CMYK and RGBA files, as in the real data, which is what the pipeline's image normalisation must handle).

Everything is derived from `seed` through per-image random generators, so the same arguments give
byte-identical parquet files, and the folder appears atomically (built in a hidden sibling, then
renamed), so a crash never leaves a half-written source that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.offline.card import dataset_card
from car_maker_pipeline.offline.corruptions import ALL_CORRUPTIONS, corrupt_image, encode_image, pick_format
from car_maker_pipeline.offline.generation_cache import via_cache
from car_maker_pipeline.offline.population import (
    IMAGE_SIZE_MODES,
    drawing_size,
    images_per_maker,
    realistic_image_size,
)
from car_maker_pipeline.offline.rendering import classes_by_maker, render_car
from car_maker_pipeline.offline.split_files import SplitFile, read_split_file
from car_maker_pipeline.storage import remove_stale_temporaries, temporary_prefix

# Six makers with very different looks and 1 to 13 classes each (AM General has a single class,
# BMW thirteen), so maker-level class imbalance inside a maker is exercised too.
DEMO_MAKERS: tuple[str, ...] = ("AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce")

MARKER_FILE = ".car_maker_demo_source.json"


# --------------------------------------------------------------------------------------------------
# The dataset folder
# --------------------------------------------------------------------------------------------------


def _features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(stanford_cars_class_names()))}
    )


def _stream_id(name: str) -> int:
    """A stable integer per split name, mixed into the per-image seeds so every split draws differently."""
    return zlib.crc32(name.encode())


def _image_rng(seed: int, stream: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _stream_id(stream), index, attempt])


def _split_plan(counts: dict[str, int], seed: int, split: str) -> list[tuple[str, int, str]]:
    """(maker, label, class name) per row: each maker's classes in a shuffled round robin, rows shuffled."""
    rng = np.random.default_rng([seed, _stream_id(split), 0x5EED])
    rows: list[tuple[str, int, str]] = []
    for maker, count in counts.items():
        classes = classes_by_maker()[maker]
        order = rng.permutation(len(classes))
        rows.extend((maker, *classes[order[i % len(classes)]]) for i in range(count))
    return [rows[i] for i in rng.permutation(len(rows))]


class _Uniqueness:
    """Content hashes of every image written so far: no two rows, in any split, share image bytes."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def add(self, data: bytes) -> bool:
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


def _render_split(
    split: str,
    plan: list[tuple[str, int, str]],
    image_size: tuple[int, int] | None,
    seed: int,
    unique: _Uniqueness,
    writer: SplitFile,
) -> list[tuple[str, int]]:
    """Render, encode and write one split row by row; returns each row's (format, quality).

    `image_size` None draws each at a realistic size (see population.py). Rows go straight to the
    split's file, so memory holds one row group of encoded images, not the split.
    """
    encodings: list[tuple[str, int]] = []
    for index, (maker, label, name) in enumerate(plan):
        for attempt in range(100):
            rng = _image_rng(seed, split, index, attempt)
            if image_size is None:
                final = realistic_image_size(_image_rng(seed, f"{split}/size", index))
                picture = render_car(maker, name, rng, drawing_size(final))
                if picture.size != final:
                    picture = picture.resize(final, Image.Resampling.BILINEAR)
            else:
                picture = render_car(maker, name, rng, image_size)
            kind, quality = pick_format(rng)
            data = encode_image(picture, kind, quality)
            if unique.add(data):
                break
        else:  # pragma: no cover - would need 100 hash collisions
            raise RuntimeError(f"Could not render a unique image for row {index} of split {split!r}.")
        writer.add(data, label)
        encodings.append((kind, quality))
    return encodings


def _corrupt_split(
    corruption: str,
    test_file: Path,
    encodings: list[tuple[str, int]],
    seed: int,
    unique: _Uniqueness,
    writer: SplitFile,
) -> None:
    """The test images, read back from `test_file` as stored, corrupted, and re-encoded in their
    original format and mode, written to `writer` with the test labels."""
    for index, ((data, label), (kind, quality)) in enumerate(zip(read_split_file(test_file), encodings)):
        with Image.open(io.BytesIO(data)) as stored:
            original = stored.convert("RGB")
        for attempt in range(100):
            corrupted = corrupt_image(original, corruption, _image_rng(seed, corruption, index, attempt))
            out = encode_image(corrupted, kind, quality)
            if unique.add(out):
                break
        else:  # pragma: no cover
            raise RuntimeError(f"Could not make a unique {corruption!r} image for test row {index}.")
        writer.add(out, label)


def _validated(
    makers: Sequence[str],
    corruptions: Sequence[str],
    train_per_maker: int,
    test_per_maker: int,
    image_size: tuple[int, int],
) -> tuple[list[str], list[str]]:
    if isinstance(makers, str) or isinstance(corruptions, str):
        raise ValueError("makers and corruptions must be sequences of names, not a single string.")
    known = classes_by_maker()
    makers, corruptions = list(makers), list(corruptions)
    bad_makers = [m for m in makers if m not in known]
    if bad_makers:
        raise ValueError(
            f"Unknown maker(s) {bad_makers}: no Stanford Cars class is made by them. "
            f"Valid makers are: {', '.join(sorted(known))}."
        )
    if not makers:
        raise ValueError(f"makers is empty; pick at least one of: {', '.join(sorted(known))}.")
    if len(set(makers)) != len(makers):
        raise ValueError(f"makers lists a maker twice: {makers}.")
    bad_corruptions = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if bad_corruptions:
        raise ValueError(
            f"Unknown corruption(s) {bad_corruptions}; valid corruptions are: {', '.join(ALL_CORRUPTIONS)}."
        )
    if len(set(corruptions)) != len(corruptions):
        raise ValueError(f"corruptions lists a corruption twice: {corruptions}.")
    if train_per_maker < 1 or test_per_maker < 1:
        raise ValueError(
            f"train_per_maker and test_per_maker must be at least 1 (got {train_per_maker}, {test_per_maker})."
        )
    if len(image_size) != 2 or min(image_size) < 16:
        raise ValueError(f"image_size must be (width, height) of at least 16 pixels each, got {image_size!r}.")
    return makers, corruptions


def _make_room(out_dir: Path) -> None:
    """Refuse to replace an existing non-empty folder unless this module made it."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder; choose another out_dir for the demo source.")
        if any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).exists():
            raise FileExistsError(
                f"{out_dir} exists, is not empty and was not made by generate_demo_source; refusing to replace it. "
                "Delete it or choose another out_dir."
            )


def generate_demo_source(
    out_dir: str | Path,
    *,
    makers: Sequence[str] = DEMO_MAKERS,
    train_per_maker: int = 60,
    test_per_maker: int = 30,
    corruptions: Sequence[str] = ("contrast", "gaussian_noise", "motion_blur"),
    image_size: tuple[int, int] = (128, 96),
    image_sizes: str = "demo",
    balance: str = "uniform",
    train_total: int | None = None,
    test_total: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic, Stanford-Cars-shaped source to `out_dir` and return `out_dir` as a Path.

    Splits: `train` and `test` with `*_per_maker` rows per maker (`balance="stanford"`: shared in
    proportion to each maker's real class count; `*_total`: that many rows in all), plus one
    corrupted copy of `test` per name in `corruptions` (same rows, labels and order). Images are
    `image_size` (default) or, with `image_sizes="realistic"`, sized like real photos (population.py). Labels are the real class ids of the
    makers' classes. Same arguments give byte-identical parquet files. An existing folder is replaced
    only if an earlier call made it; the new folder appears in one rename, never half-written.
    """
    makers, corruptions = _validated(makers, corruptions, train_per_maker, test_per_maker, image_size)
    if image_sizes not in IMAGE_SIZE_MODES:
        raise ValueError(f"Unknown image_sizes {image_sizes!r}; use one of {', '.join(IMAGE_SIZE_MODES)}.")
    class_counts = {maker: len(classes) for maker, classes in classes_by_maker().items()}
    train_counts = images_per_maker(makers, train_per_maker, balance, class_counts, train_total)
    test_counts = images_per_maker(makers, test_per_maker, balance, class_counts, test_total)
    draw_size = (int(image_size[0]), int(image_size[1])) if image_sizes == "demo" else None
    out_dir = Path(out_dir).expanduser().absolute()
    _make_room(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    features = _features()
    settings = {
        "makers": makers,
        "train_per_maker": train_per_maker,
        "test_per_maker": test_per_maker,
        "corruptions": corruptions,
        "image_size": list(image_size),
        "seed": seed,
    }
    # Recorded only when not the default, so default sources keep their settings (and bytes) unchanged.
    if image_sizes != "demo":
        settings["image_sizes"] = image_sizes
    if balance != "uniform":
        settings["balance"] = balance
    if train_total is not None or test_total is not None:
        settings.update(train_total=train_total, test_total=test_total)
    remove_stale_temporaries(out_dir.parent)  # a generation killed mid-write leaves its folder behind
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=temporary_prefix(out_dir.name)))
    try:
        (tmp / "data").mkdir()
        unique = _Uniqueness()
        splits: dict[str, tuple[int, int]] = {}

        def split_file(split: str) -> SplitFile:
            return SplitFile(tmp / "data" / f"{split}-00000-of-00001.parquet", features)

        with split_file("train") as writer:
            _render_split("train", _split_plan(train_counts, seed, "train"), draw_size, seed, unique, writer)
        splits["train"] = writer.counts
        with split_file("test") as test:
            encodings = _render_split("test", _split_plan(test_counts, seed, "test"), draw_size, seed, unique, test)
        splits["test"] = test.counts
        for corruption in corruptions:
            with split_file(corruption) as corrupted:
                _corrupt_split(corruption, test.path, encodings, seed, unique, corrupted)
            splits[corruption] = corrupted.counts

        (tmp / "README.md").write_text(dataset_card(stanford_cars_class_names(), splits, settings))
        (tmp / MARKER_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the finished source should be readable like any folder

        if out_dir.exists():  # made by us (checked above): swap it out, then drop the old copy
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "source")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out_dir)
            except OSError:
                # Another process finished the same folder first. Same settings mean byte-identical
                # content, so theirs is as good as ours; anything else is a real conflict.
                marker = out_dir / MARKER_FILE
                if not (marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(settings))):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_demo_source(parent: Path, **settings) -> Path:
    """The demo source for these `generate_demo_source` settings under `parent`, generated on first use
    (or copied from the generation cache, `generation_cache.py`, when one is configured).

    One folder per distinct setting: the name lists the settings that differ from the defaults, so
    a default source keeps the folder name it always had.
    """
    defaults = {
        "makers": DEMO_MAKERS,
        "image_sizes": "demo",
        "balance": "uniform",
        "train_total": None,
        "test_total": None,
    }
    name = (
        f"seed{settings.get('seed', 0)}-train{settings['train_per_maker']}-test{settings['test_per_maker']}-"
        f"{'_'.join(settings.get('corruptions', ())) or 'none'}"
    )
    extras = []
    for key, default in defaults.items():
        value = settings.get(key, default)
        if isinstance(value, (list, tuple)):
            value, default = tuple(value), tuple(default)
        if value != default:
            extras.append(f"{key}={len(value) if key == 'makers' else value}")
    if extras:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:8]
        name += "-" + "-".join(extras).replace(" ", "") + f"-{digest}"
    folder = parent / name
    if not (folder / "data").is_dir():
        settings = {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}
        via_cache(folder, "sources", lambda out: (out / "data").is_dir() or generate_demo_source(out, **settings))
    return folder
