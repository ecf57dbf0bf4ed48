"""Build the maker-level dataset from the raw Stanford Cars source.

Each image is decoded exactly once: that decode proves it is readable, yields its RGB pixels for a
content hash, and, when the stored bytes are not already an RGB JPEG/PNG, the RGB re-encoding.
Undecodable images are dropped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from car_maker_pipeline.data.makers import makers_for_class_names, parse_class_name
from car_maker_pipeline.model_inputs.images import to_rgb
from car_maker_pipeline.storage import atomic_directory, read_json, write_json_atomic

TRAIN, VALIDATION, TEST = "train", "validation", "test"
_COMPLETE = "_DATASET_COMPLETE.json"
# Pillow's default guard is ~89 Mpx (warning) / 179 Mpx (error); a real car photo is under 1 Mpx.
MAX_IMAGE_PIXELS = 64_000_000


class MakerDatasetError(ValueError):
    """The source cannot be turned into a maker dataset; the message says why and what to do."""


@dataclass(frozen=True)
class MakerDatasetParams:
    validation_fraction: float = 0.1
    seed: int = 0
    num_proc: int | None = None  # None: one process per core for large sources

    def fingerprint(self) -> str:
        blob = json.dumps({"validation_fraction": self.validation_fraction, "seed": self.seed, "v": 2}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass
class MakerDataset:
    path: str
    makers: list[str]
    rows_per_split: dict[str, int]
    dropped_undecodable: dict[str, int]
    dropped_bad_label: dict[str, int]
    images_per_maker: dict[str, dict[str, int]]  # split -> maker -> count
    source_revision: str
    seconds: float = 0.0
    cache_hit: bool = False
    corrupted_splits: list[str] = field(default_factory=list)
    dropped_duplicate: dict[str, int] = field(default_factory=dict)  # same pixels as an earlier row of the split

    def to_json(self) -> dict:
        return asdict(self)

    def load(self) -> datasets.DatasetDict:
        return datasets.load_from_disk(self.path)

    @property
    def num_makers(self) -> int:
        return len(self.makers)

    @property
    def dropped_total(self) -> int:
        return (
            sum(self.dropped_undecodable.values())
            + sum(self.dropped_bad_label.values())
            + sum(self.dropped_duplicate.values())
        )

    def counts_markdown(self) -> str:
        frame = pd.DataFrame(self.images_per_maker).fillna(0).astype(int)
        frame = frame.reindex(index=self.makers, fill_value=0)
        frame.loc["total"] = frame.sum()
        frame.index.name = "maker"
        return frame.to_markdown()


def column(part: datasets.Dataset, name: str) -> list:
    """One column as a Python list, read through Arrow: `part[name]` would decode every image of the row."""
    return part.with_format("arrow")[name].to_pylist()


def decode_once(data: bytes) -> tuple[bytes, str] | None:
    """(RGB-ready encoded bytes, pixel hash), or None when the bytes are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                return None
            opened.load()  # first frame of an animation; raises on truncated data
            rotated = opened.getexif().get(0x0112, 1) not in (0, 1)  # EXIF orientation tag
            rgb = to_rgb(ImageOps.exif_transpose(opened) if rotated else opened)
            pixel_hash = hashlib.blake2b(rgb.tobytes(), digest_size=16)
            pixel_hash.update(f"{rgb.width}x{rgb.height}".encode())
            if rgb is opened and opened.format in ("JPEG", "PNG"):
                encoded = data  # already an upright RGB JPEG/PNG: keep the original bytes, no re-encode
            else:
                buffer = io.BytesIO()
                rgb.save(buffer, format="PNG")  # lossless, so the one conversion is the only change
                encoded = buffer.getvalue()
            return encoded, pixel_hash.hexdigest()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError):
        return None


def _process_batch(batch: dict, parsed: list) -> dict:
    out = {
        "image": [],
        "maker": [],
        "source_class": [],
        "source_label": [],
        "model": [],
        "year": [],
        "content_hash": [],
        "keep": [],
        "bad_label": [],
    }
    for raw, label in zip(batch["image"], batch["label"]):
        bad_label = label is None or not 0 <= int(label) < len(parsed)
        decoded = None
        if not bad_label and raw is not None:
            data = raw.get("bytes") or (Path(raw["path"]).read_bytes() if raw.get("path") else None)
            decoded = decode_once(data) if data else None
        info = parsed[int(label)] if not bad_label else None
        out["image"].append({"bytes": decoded[0], "path": None} if decoded else None)
        out["content_hash"].append(decoded[1] if decoded else "")
        out["maker"].append(info.maker if info else "")
        out["source_class"].append(info.source_class if info else "")
        out["source_label"].append(int(label) if not bad_label else -1)
        out["model"].append(info.model if info else "")
        out["year"].append(info.year if info and info.year is not None else -1)
        out["keep"].append(decoded is not None)
        out["bad_label"].append(bad_label)
    return out


def _clean_split(part: datasets.Dataset, parsed: list, num_proc: int | None) -> tuple[datasets.Dataset, int, int, int]:
    part = part.cast_column("image", datasets.Image(decode=False))
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "maker": datasets.Value("string"),
            "source_class": datasets.Value("string"),
            "source_label": datasets.Value("int32"),
            "model": datasets.Value("string"),
            "year": datasets.Value("int32"),
            "content_hash": datasets.Value("string"),
            "keep": datasets.Value("bool"),
            "bad_label": datasets.Value("bool"),
        }
    )
    procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 4) if part.num_rows >= 4000 else None)
    processed = part.map(
        _process_batch,
        fn_kwargs={"parsed": parsed},
        batched=True,
        batch_size=256,
        # num_proc=1 would still start a worker process; None keeps the work in this one.
        remove_columns=part.column_names,
        features=features,
        num_proc=procs if procs and procs > 1 else None,
        load_from_cache_file=False,
        desc="decode images",
    )
    keep = np.asarray(column(processed, "keep"))
    bad_label = np.asarray(column(processed, "bad_label"))
    dropped_bad_label = int(bad_label.sum())
    dropped_undecodable = int((~keep & ~bad_label).sum())
    # A row whose pixels already appeared earlier in the split is a duplicate: it would count twice in
    # accuracy (test) or be over-weighted (train). The first occurrence stays.
    seen: set[str] = set()
    duplicate = np.zeros_like(keep)
    for index, content_hash in enumerate(column(processed, "content_hash")):
        if keep[index]:
            duplicate[index] = content_hash in seen
            seen.add(content_hash)
    cleaned = processed.select(np.flatnonzero(keep & ~duplicate)).remove_columns(["keep", "bad_label"])
    return cleaned, dropped_undecodable, dropped_bad_label, int(duplicate.sum())


def build_maker_dataset(
    raw: datasets.DatasetDict,
    out_dir: Path,
    params: MakerDatasetParams = MakerDatasetParams(),
    source_revision: str = "unknown",
) -> MakerDataset:
    """Collapse classes to makers, drop unreadable images, carve a stratified validation split."""
    started = time.perf_counter()
    for required in (TRAIN, TEST):
        if required not in raw:
            raise MakerDatasetError(
                f"The source has no {required!r} split (it has {list(raw)}); both train and test are required."
            )
    for split, part in raw.items():
        for required_column in ("image", "label"):
            if required_column not in part.column_names:
                raise MakerDatasetError(
                    f"Split {split!r} lacks the {required_column!r} column (it has {part.column_names})."
                )
        if part.num_rows == 0:
            raise MakerDatasetError(f"Split {split!r} is empty; every split of the source needs rows.")
        if not isinstance(part.features["label"], datasets.ClassLabel):
            raise MakerDatasetError(
                f"Split {split!r} has a 'label' column of type {part.features['label']!r}; it must be a ClassLabel "
                "holding the 196 Stanford Cars class names (as in tanganke/stanford_cars). Cast it with "
                "`dataset.cast_column('label', datasets.ClassLabel(names=[...]))`."
            )
    class_names = list(raw[TRAIN].features["label"].names)
    makers_for_class_names(class_names)  # every unknown class name, reported at once
    parsed = [parse_class_name(name) for name in class_names]

    cleaned, dropped_undecodable, dropped_bad_label, dropped_duplicate = {}, {}, {}, {}
    for split, part in raw.items():
        cleaned[split], dropped_undecodable[split], dropped_bad_label[split], dropped_duplicate[split] = _clean_split(
            part, parsed, params.num_proc
        )
        if cleaned[split].num_rows == 0:
            raise MakerDatasetError(
                f"Split {split!r} has no readable image left ({dropped_undecodable[split]} undecodable, "
                f"{dropped_bad_label[split]} with labels outside the class list)."
            )

    makers = sorted(set(column(cleaned[TRAIN], "maker")) | set(column(cleaned[TEST], "maker")))
    maker_label = datasets.ClassLabel(names=makers)

    def with_maker_id(part: datasets.Dataset) -> datasets.Dataset:
        ids = [maker_label.str2int(m) for m in column(part, "maker")]
        part = part.add_column("maker_id", ids).cast_column("maker_id", maker_label)
        return part.cast_column("image", datasets.Image())

    splits = {split: with_maker_id(part) for split, part in cleaned.items()}
    counts = Counter(column(splits[TRAIN], "maker"))
    too_few = sorted(m for m in makers if counts[m] < 2)
    if too_few:
        raise MakerDatasetError(
            f"Maker(s) {too_few} have fewer than 2 training images, so no stratified validation split can hold them. "
            "Use a source with more training images per maker."
        )
    # A stratified split needs a validation row per maker: a small source gets that minimum instead of
    # the fraction (every maker has >= 2 training images, checked above, so train keeps one of each).
    test_size: float | int = params.validation_fraction
    if int(params.validation_fraction * splits[TRAIN].num_rows) < len(makers):
        test_size = len(makers)
    carved = splits[TRAIN].train_test_split(test_size=test_size, stratify_by_column="maker_id", seed=params.seed)
    splits[TRAIN], splits[VALIDATION] = carved["train"], carved["test"]
    ordered = {name: splits[name] for name in (TRAIN, VALIDATION, TEST)}
    ordered.update({name: part for name, part in splits.items() if name not in ordered})
    result = datasets.DatasetDict(ordered)

    with atomic_directory(out_dir) as tmp:
        result.save_to_disk(str(tmp))
        record = MakerDataset(
            path=str(out_dir),
            makers=makers,
            rows_per_split={name: part.num_rows for name, part in result.items()},
            dropped_undecodable=dropped_undecodable,
            dropped_bad_label=dropped_bad_label,
            dropped_duplicate=dropped_duplicate,
            images_per_maker={name: dict(Counter(column(part, "maker"))) for name, part in result.items()},
            source_revision=source_revision,
            corrupted_splits=[name for name in result if name not in (TRAIN, VALIDATION, TEST)],
        )
        write_json_atomic(tmp / _COMPLETE, record.to_json())
    record.seconds = time.perf_counter() - started
    return record


def load_stored_maker_dataset(out_dir: Path) -> MakerDataset | None:
    """The record of a complete stored build, or None when absent or half-written."""
    marker = out_dir / _COMPLETE
    if not marker.exists():
        return None
    record = MakerDataset(**read_json(marker))
    record.cache_hit = True
    return record
