"""Labeled images added to the source: how they are stored, and how they join the maker dataset.

The `labeled_additions` asset (in `labeling`) checks each batch and stores its accepted rows here in
ADDED_FEATURES; the maker dataset build appends them to train, or to validation for a batch marked so,
with the batch id in the `provenance` column (`source` for the source's own rows). Test is never
touched. The pixel index of the source (every row's hash, and the makers of train and test) is what
an addition is checked against, so it lives here too, beside the decoding it shares with the build.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd

from car_maker_pipeline.data.dataset_spec import TEST, TRAIN, VALIDATION, column
from car_maker_pipeline.data.decoding import BAD_LABEL, DUPLICATE, Refusal, decode_checked
from car_maker_pipeline.data.makers import maker_of
from car_maker_pipeline.storage import read_json, write_json_atomic
from car_maker_pipeline.store import LABELED_ADDITIONS, MissingUpstreamError, PipelineStore

SOURCE = "source"  # the provenance of the source's own rows
ROWS_FILE = "rows.parquet"  # a batch's accepted rows, in its stored folder
ADDED_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "maker": datasets.Value("string"),
        "source_class": datasets.Value("string"),  # the class name when the label was one, else ""
        "model": datasets.Value("string"),
        "year": datasets.Value("int32"),
        "content_hash": datasets.Value("string"),
        "provenance": datasets.Value("string"),  # the batch id
        "file": datasets.Value("string"),  # the row's path in its batch
    }
)


@dataclass(frozen=True)
class AddedBatch:
    """A stored batch as the maker dataset build sees it: which rows go to which split."""

    batch_id: str
    split: str  # TRAIN or VALIDATION
    path: str  # the stored folder holding ROWS_FILE
    accepted: int

    def load(self) -> datasets.Dataset:
        return datasets.Dataset.from_parquet(str(Path(self.path) / ROWS_FILE), features=ADDED_FEATURES)


def write_added_rows(rows: list[dict], folder: Path) -> None:
    """Store accepted rows ({"image": bytes, "maker", ...}) as the batch's ROWS_FILE."""
    table = {name: [row[name] for row in rows] for name in ADDED_FEATURES}
    table["image"] = [{"bytes": data, "path": None} for data in table["image"]]
    datasets.Dataset.from_dict(table, features=ADDED_FEATURES).to_parquet(str(folder / ROWS_FILE))


def current_added_batches(store: PipelineStore) -> list[AddedBatch]:
    """The batches of the current labeled_additions, in ingestion order (none when never materialized)."""
    try:
        manifest = store.read_manifest(LABELED_ADDITIONS)
    except MissingUpstreamError:
        return []
    return [
        AddedBatch(b["batch_id"], b["split"], b["path"], b["accepted"]) for b in manifest["batches"] if b["accepted"]
    ]


def additions_digest(batches: list[AddedBatch]) -> str:
    """Names the set of added rows: part of the dataset's folder, hence of its data version."""
    payload = [[batch.batch_id, batch.split] for batch in batches]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:8]


def append_added_rows(
    splits: dict[str, datasets.Dataset],
    batches: list[AddedBatch],
    maker_label: datasets.ClassLabel,
    class_names: list[str],
) -> tuple[dict[str, datasets.Dataset], list[dict]]:
    """Train and validation with every batch's rows appended (`provenance` on every row); dropped rows with why.

    A row whose maker is not in the dataset, or whose pixels are already in any split, is dropped
    here too: the batch was checked when it was ingested, but against the source of that moment.
    """
    index = {name: position for position, name in enumerate(class_names)}
    splits = {name: part.add_column("provenance", [SOURCE] * part.num_rows) for name, part in splits.items()}
    seen = set().union(*(set(column(part, "content_hash")) for part in splits.values()))
    dropped: list[dict] = []
    for batch in batches:
        rows = batch.load()
        keep = []
        for position, (maker, content_hash, file) in enumerate(
            zip(column(rows, "maker"), column(rows, "content_hash"), column(rows, "file"))
        ):
            if maker not in maker_label.names:
                reason, problem = BAD_LABEL, f"maker {maker!r} is not in the dataset"
            elif content_hash in seen:
                reason, problem = DUPLICATE, "the same pixels as a row already in the dataset"
            else:
                reason = ""
            if reason:
                detail = f"{batch.batch_id}/{file}: {problem}"
                dropped.append({"split": batch.split, "index": position, "reason": reason, "detail": detail})
                continue
            seen.add(content_hash)
            keep.append(position)
        rows = rows.select(keep)
        ids = [maker_label.str2int(maker) for maker in column(rows, "maker")]
        labels = [index.get(name, -1) for name in column(rows, "source_class")]
        rows = rows.remove_columns("file").add_column("source_label", labels).add_column("maker_id", ids)
        target = splits[batch.split]
        rows = rows.cast(target.features).select_columns(target.column_names)
        splits[batch.split] = datasets.concatenate_datasets([target, rows])
    return splits, dropped


def rows_per_maker(part: datasets.Dataset) -> dict[str, int]:
    return dict(Counter(column(part, "maker")))


@dataclass(frozen=True)
class SourceIndex:
    """What an addition is checked against: each source image's pixel hash, and the dataset's makers."""

    hashes: dict[str, str]  # pixel hash -> "<split> row <n>"
    makers: list[str]  # the makers of train and test, as the maker dataset will list them
    class_names: list[str]

    @classmethod
    def cached(cls, raw, folder: Path) -> SourceIndex:
        """The index of the raw source `raw` (a RawDataset), computed once per source revision under `folder`."""
        stored = folder / f"{hashlib.sha256(raw.revision.encode()).hexdigest()[:16]}.json"
        if stored.exists():
            return cls(**read_json(stored))
        index = cls.of(raw.load())
        write_json_atomic(stored, {"hashes": index.hashes, "makers": index.makers, "class_names": index.class_names})
        return index

    @classmethod
    def of(cls, raw: datasets.DatasetDict) -> SourceIndex:
        hashes: dict[str, str] = {}
        makers: set[str] = set()
        class_names: list[str] = []
        for split, part in raw.items():
            names = part.features["label"].names
            class_names += [name for name in names if name not in class_names]
            labels = column(part, "label")
            if split in (TRAIN, TEST):
                makers |= {
                    maker_of(names[label]) for label in set(labels) if label is not None and 0 <= label < len(names)
                }
            images = part.cast_column("image", datasets.Image(decode=False)).with_format("arrow")
            for start in range(0, part.num_rows, 256):
                for offset, raw_image in enumerate(images[start : start + 256]["image"].to_pylist()):
                    decoded = decode_checked((raw_image or {}).get("bytes"))
                    if not isinstance(decoded, Refusal):
                        hashes.setdefault(decoded[1], f"{split} row {start + offset}")
        return cls(hashes=hashes, makers=sorted(makers), class_names=class_names)


ADDABLE_SPLITS = (TRAIN, VALIDATION)


def before_after_table(record) -> pd.DataFrame:
    """Rows per maker in train and validation before and after the additions (a MakerDataset `record`)."""
    before = record.images_per_maker_before_additions or {s: record.images_per_maker.get(s, {}) for s in ADDABLE_SPLITS}
    columns = {}
    for split in ADDABLE_SPLITS:
        columns[f"{split}_before"] = [before.get(split, {}).get(maker, 0) for maker in record.makers]
        columns[f"{split}_after"] = [record.images_per_maker.get(split, {}).get(maker, 0) for maker in record.makers]
    return pd.DataFrame({"maker": record.makers, **columns})
