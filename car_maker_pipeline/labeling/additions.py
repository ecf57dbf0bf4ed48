"""labeled_additions: batches of extra labeled images, checked row by row and stored once, immutable.

Each batch in the additions folder (`batch_files`) is identified by its content. A batch already
ingested is never ingested again: renaming its folder keeps it, changing any byte makes a new batch
(the old one stays stored, no longer current). A batch is stored whole or not at all (one atomic
folder), and every row is accepted or refused with its reason:

| reason                      | when                                                                  |
|-----------------------------|-----------------------------------------------------------------------|
| `unknown label`             | neither one of the dataset's makers nor one of its class names (case and spaces ignored) |
| `no label`                  | an image outside any label folder; a Label Studio task skipped, without a choice, or with two |
| `undecodable` / `too large` | the source's decoding rules (`data.decoding`), an empty file, a file that cannot be read |
| `outside the batch`         | `../` climbing out, an absolute path, a link leading out              |
| `duplicate`                 | the same pixels as an earlier row of the batch                        |
| `duplicate of the dataset`  | the same pixels as a source image (train, validation, test or a corrupted copy) or a row of an earlier batch |

Test images are matched by their decoded pixels, so a test image re-encoded losslessly (PNG, another
container) is refused; a lossy re-encoding changes the pixels and is not recognised.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from car_maker_pipeline.data.added_rows import ROWS_FILE, SourceIndex, write_added_rows
from car_maker_pipeline.data.decoding import DUPLICATE, Refusal, decode_checked
from car_maker_pipeline.data.makers import KNOWN_MAKERS, normalize_class_name, parse_class_name
from car_maker_pipeline.labeling.batch_files import NO_LABEL, BatchError, BatchFiles, candidates, list_batches
from car_maker_pipeline.storage import atomic_directory, read_json, write_json_atomic

ADDITIONS_FOLDER = "additions"  # under CAR_MAKER_HOME unless configured otherwise
UNKNOWN_LABEL = "unknown label"
DUPLICATE_OF_DATASET = "duplicate of the dataset"
REFUSED_COLUMNS = ["batch", "path", "label", "reason", "detail"]
RECORD_FILE, REFUSED_FILE = "batch.json", "refused.json"


class AdditionsError(ValueError):
    """One or more batches could not be read at all; the message names them and says what to do."""


@dataclass
class IngestedBatch:
    """A stored batch: immutable once written (only `name`, where it is now, is updated in the manifest)."""

    batch_id: str
    name: str
    layout: str
    split: str
    path: str  # the stored folder
    rows: int
    accepted: int
    refused_by_reason: dict[str, int]
    accepted_per_maker: dict[str, int]
    ingested_at: float
    ingested_as: str = ""  # the name it had when ingested

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Additions:
    folder: str
    batches: list[IngestedBatch]  # current, in ingestion order
    new: list[str] = field(default_factory=list)  # batch ids ingested by this call
    refused: list[dict] = field(default_factory=list)  # every refused row of the current batches
    skipped_copies: list[str] = field(default_factory=list)  # folders with the same content as another

    def to_json(self) -> dict:
        return {"folder": self.folder, "batches": [batch.to_json() for batch in self.batches], "new": self.new}


class Labels:
    """Labels the dataset understands: its makers and its class names, compared as the source compares them."""

    def __init__(self, index: SourceIndex):
        self.makers = {maker.casefold(): maker for maker in index.makers}
        self.classes = {normalize_class_name(name).casefold(): name for name in index.class_names}

    def resolve(self, label: str) -> tuple[str, str] | str:
        """(maker, class name or "") for a known label, else the reason it is unknown."""
        folded = normalize_class_name(label).casefold()
        if folded in self.makers:
            return self.makers[folded], ""
        if folded in self.classes:
            name = self.classes[folded]
            maker = parse_class_name(name).maker
            if maker in self.makers.values():
                return maker, name
            return f"{name!r} is a class of {maker}, which has no image in this dataset's train or test split"
        if folded in {maker.casefold() for maker in KNOWN_MAKERS}:
            return f"{label!r} is a car maker, but not one of this dataset's makers ({', '.join(self.makers.values())})"
        return (
            f"{label!r} is neither one of the dataset's makers ({', '.join(self.makers.values())}) "
            f"nor one of its {len(self.classes)} class names"
        )


def ingest_additions(folder: Path, store_dir: Path, index: SourceIndex | Callable[[], SourceIndex]) -> Additions:
    """Ingest every new batch in `folder` into `store_dir/<batch id>/`; the current batches, in ingestion order.

    `index` may be a function giving it: it is then called only when a new batch is to be checked (the
    source's pixel index decodes every source image the first time).

    Every readable new batch is stored; if any batch cannot be read at all, AdditionsError names it
    (and what to do) after the others are stored, so the caller leaves the current state unchanged.
    """
    failures: list[str] = []
    labels: Labels | None = None
    listed = list_batches(folder, errors=failures)  # a batch unreadable as a whole is named, the others go on
    stored = {
        b.batch_id: _load(store_dir / b.batch_id) for b in listed if (store_dir / b.batch_id / RECORD_FILE).exists()
    }
    current = sorted((record for record in stored.values()), key=lambda record: record.ingested_at)
    result = Additions(str(folder), [])
    seen: dict[str, str] = {}
    for record in current:
        seen.update(dict.fromkeys(_accepted_hashes(record), f"a row of {record.batch_id}"))
    for batch in listed:
        if batch.batch_id in stored or batch.batch_id in result.new:
            continue
        if labels is None:
            index = index() if callable(index) else index
            labels = Labels(index)
        try:
            record = _ingest(batch, store_dir / batch.batch_id, labels, index, seen)
        except BatchError as error:
            failures.append(str(error))
            continue
        current.append(record)
        result.new.append(record.batch_id)
        seen.update(dict.fromkeys(_accepted_hashes(record), f"a row of {record.batch_id}"))
    if failures:
        raise AdditionsError(
            f"{len(failures)} batch(es) in {folder} cannot be read, so no batch was made current: "
            + " | ".join(failures)
            + " Fix or remove them, then materialize labeled_additions again."
        )
    names = {}
    for batch in listed:
        if batch.batch_id in names:
            result.skipped_copies.append(f"{batch.name} (same content as {names[batch.batch_id]})")
        names.setdefault(batch.batch_id, batch.name)
    for record in current:
        record.name = names[record.batch_id]
        result.refused += read_json(Path(record.path) / REFUSED_FILE)
    result.batches = current
    return result


def _load(path: Path) -> IngestedBatch:
    return IngestedBatch(**read_json(path / RECORD_FILE))


def _accepted_hashes(record: IngestedBatch) -> list[str]:
    if not record.accepted:
        return []
    return pq.read_table(Path(record.path) / ROWS_FILE, columns=["content_hash"]).column(0).to_pylist()


def _ingest(batch: BatchFiles, out: Path, labels: Labels, index: SourceIndex, seen: dict[str, str]) -> IngestedBatch:
    """Check every row of one batch and store it whole (atomically) under `out`."""
    accepted, refused, in_batch = [], [], {}
    for row in candidates(batch):
        refusal = _check(row, labels)
        if isinstance(refusal, Refusal):
            refused.append({"batch": batch.batch_id, "path": row.path, "label": row.label or "", **asdict(refusal)})
            continue
        (maker, class_name), (image, content_hash) = refusal
        duplicate = _duplicate(content_hash, in_batch, index, seen)
        if duplicate:
            refused.append({"batch": batch.batch_id, "path": row.path, "label": row.label or "", **asdict(duplicate)})
            continue
        in_batch[content_hash] = row.path
        parsed = parse_class_name(class_name) if class_name else None
        accepted.append(
            {
                "image": image,
                "maker": maker,
                "source_class": class_name,
                "model": parsed.model if parsed else "",
                "year": parsed.year if parsed and parsed.year is not None else -1,
                "content_hash": content_hash,
                "provenance": batch.batch_id,
                "file": row.path,
            }
        )
    record = IngestedBatch(
        batch_id=batch.batch_id,
        name=batch.name,
        layout=batch.layout,
        split=batch.split,
        path=str(out),
        rows=len(accepted) + len(refused),
        accepted=len(accepted),
        refused_by_reason=dict(Counter(row["reason"] for row in refused)),
        accepted_per_maker=dict(Counter(row["maker"] for row in accepted)),
        ingested_at=time.time(),
        ingested_as=batch.name,
    )
    with atomic_directory(out) as tmp:
        if accepted:
            write_added_rows(accepted, tmp)
        write_json_atomic(tmp / REFUSED_FILE, refused)
        write_json_atomic(tmp / RECORD_FILE, record.to_json())  # last: its presence means "stored whole"
    return record


def _check(row, labels: Labels) -> Refusal | tuple[tuple[str, str], tuple[bytes, str]]:
    """((maker, class name), (image bytes, pixel hash)) for a usable row, else its Refusal."""
    if row.reason:
        return Refusal(row.reason, row.detail)
    if not row.label:
        return Refusal(NO_LABEL, "the row has no label")
    resolved = labels.resolve(row.label)
    if isinstance(resolved, str):
        return Refusal(UNKNOWN_LABEL, resolved)
    decoded = decode_checked(row.data)
    return decoded if isinstance(decoded, Refusal) else (resolved, decoded)


def _duplicate(content_hash: str, in_batch: dict, index: SourceIndex, seen: dict[str, str]) -> Refusal | None:
    if content_hash in in_batch:
        return Refusal(DUPLICATE, f"the same pixels as {in_batch[content_hash]} in this batch")
    if content_hash in index.hashes:
        return Refusal(DUPLICATE_OF_DATASET, f"the same pixels as the source's {index.hashes[content_hash]}")
    if content_hash in seen:
        return Refusal(DUPLICATE_OF_DATASET, f"the same pixels as {seen[content_hash]}")
    return None
