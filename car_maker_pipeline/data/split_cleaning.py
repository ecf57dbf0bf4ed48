"""One split of the source, row by row: each image decoded once, its label read through the split's own
class names, its pixels hashed, and every unusable row or later duplicate dropped with its reason.

Apart from `maker_dataset`, which assembles the splits into the maker dataset: this is the per-row work
(`datasets.map` over batches, in worker processes for a large split); that module keeps the record,
its storage and the assembly.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np

from car_maker_pipeline.data.dataset_spec import column
from car_maker_pipeline.data.decoding import BAD_LABEL, DUPLICATE, UNDECODABLE, Refusal, decode_checked
from car_maker_pipeline.data.labels import label_mapping, map_label


def _image_bytes(raw: dict | None) -> bytes | Refusal | None:
    if raw is None:
        return None
    if raw.get("bytes"):
        return raw["bytes"]
    if not raw.get("path"):
        return None
    try:
        return Path(raw["path"]).read_bytes()
    except OSError as error:
        return Refusal(UNDECODABLE, f"cannot read {raw['path']}: {error.strerror or error}")


def _process_batch(batch: dict, parsed: list, own_size: int, mapping: np.ndarray | None) -> dict:
    """Decode, label and hash one batch; a dropped row gets its reason and detail instead of an image."""
    names = ("image", "maker", "source_class", "source_label", "model", "year", "content_hash", "reason", "detail")
    out = {name: [] for name in names}
    for raw, own_label in zip(batch["image"], batch["label"]):
        label = map_label(own_label, own_size, mapping)
        info = parsed[label] if label is not None and 0 <= label < len(parsed) else None
        decoded: tuple[bytes, str] | Refusal
        if label is None:
            decoded = Refusal(BAD_LABEL, "no label")
        elif info is None:
            decoded = Refusal(BAD_LABEL, f"label {own_label} is outside the split's {own_size} class names")
        else:
            data = _image_bytes(raw)
            decoded = data if isinstance(data, Refusal) else decode_checked(data)
        kept = not isinstance(decoded, Refusal)
        out["image"].append({"bytes": decoded[0], "path": None} if kept else None)
        out["content_hash"].append(decoded[1] if kept else "")
        out["reason"].append("" if kept else decoded.reason)
        out["detail"].append("" if kept else decoded.detail)
        out["maker"].append(info.maker if info else "")
        out["source_class"].append(info.source_class if info else "")
        out["source_label"].append(label if info else -1)
        out["model"].append(info.model if info else "")
        out["year"].append(info.year if info and info.year is not None else -1)
    return out


_PROCESSED = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "maker": datasets.Value("string"),
        "source_class": datasets.Value("string"),
        "source_label": datasets.Value("int32"),
        "model": datasets.Value("string"),
        "year": datasets.Value("int32"),
        "content_hash": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "detail": datasets.Value("string"),
    }
)


def clean_split(
    split: str, part: datasets.Dataset, parsed: list, class_names: list[str], num_proc: int | None, work: Path
) -> tuple[datasets.Dataset, list[dict]]:
    """The split's usable rows (maker columns added) and its dropped rows, each with its reason."""
    own_names = list(part.features["label"].names)
    part = part.cast_column("image", datasets.Image(decode=False))
    procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 4) if part.num_rows >= 4000 else None)
    processed = part.map(
        _process_batch,
        fn_kwargs={"parsed": parsed, "own_size": len(own_names), "mapping": label_mapping(own_names, class_names)},
        batched=True,
        batch_size=256,
        # num_proc=1 would still start a worker process; None keeps the work in this one.
        remove_columns=part.column_names,
        features=_PROCESSED,
        num_proc=procs if procs and procs > 1 else None,
        load_from_cache_file=False,
        # In the build's own temporary folder: next to the input, `datasets` would write into the raw store.
        cache_file_name=str(work / f"{split}-decoded.arrow"),
        desc="decode images",
    )
    reasons, details = column(processed, "reason"), column(processed, "detail")
    dropped = [
        {"split": split, "index": index, "reason": reason, "detail": detail}
        for index, (reason, detail) in enumerate(zip(reasons, details))
        if reason
    ]
    # A row whose pixels already appeared earlier in the split is a duplicate: it would count twice in
    # accuracy (test) or be over-weighted (train). The first occurrence stays.
    first_seen: dict[str, int] = {}
    keep = np.array([not reason for reason in reasons], dtype=bool)
    for index, content_hash in enumerate(column(processed, "content_hash")):
        if not keep[index]:
            continue
        if content_hash in first_seen:
            keep[index] = False
            dropped.append(
                {
                    "split": split,
                    "index": index,
                    "reason": DUPLICATE,
                    "detail": f"same pixels as row {first_seen[content_hash]}",
                }
            )
        else:
            first_seen[content_hash] = index
    cleaned = processed.select(np.flatnonzero(keep)).remove_columns(["reason", "detail"])
    return cleaned, sorted(dropped, key=lambda row: row["index"])
