"""Build the maker-level dataset from the raw Stanford Cars source.

Each image is decoded exactly once (`decoding`, row by row in `split_cleaning`). Unusable images, rows with bad labels and
duplicates are dropped, never fatal: counted per split, and listed row by row with their reason in
a small table stored with the dataset. Each split's labels are read through its own class names
(`labels`), and the build's intermediate Arrow files live in its own temporary folder, never beside
the raw store it reads (which `datasets` would otherwise fill with cache files).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import pandas as pd

from car_maker_pipeline.data.added_rows import AddedBatch, append_added_rows, rows_per_maker
from car_maker_pipeline.data.dataset_spec import (  # noqa: F401 (TRAIN...column: where callers find them)
    BUILD_VERSION,
    TEST,
    TRAIN,
    VALIDATION,
    MakerDatasetParams,
    column,
)
from car_maker_pipeline.data.decoding import BAD_LABEL, DUPLICATE, TOO_LARGE, UNDECODABLE
from car_maker_pipeline.data.decoding import decode_once as decode_once  # where callers have always found it
from car_maker_pipeline.data.labels import unified_names
from car_maker_pipeline.data.makers import makers_for_class_names, parse_class_name
from car_maker_pipeline.data.split_cleaning import clean_split
from car_maker_pipeline.storage import atomic_directory, read_json, write_json_atomic
from car_maker_pipeline.store import CAR_MAKER_DATASET, PipelineStore

_COMPLETE = "_DATASET_COMPLETE.json"
DROPPED_ROWS_FILE = "dropped_rows.json"  # every dropped row, next to the dataset it was dropped from
DROPPED_ROWS_SHOWN = 200  # rows of that table kept in the record (manifest and asset metadata)


class MakerDatasetError(ValueError):
    """The source cannot be turned into a maker dataset; the message says why and what to do."""


@dataclass
class MakerDataset:
    path: str
    makers: list[str]
    rows_per_split: dict[str, int]
    dropped_undecodable: dict[str, int]  # unreadable, or too large to prepare for a model (`size_problem`)
    dropped_bad_label: dict[str, int]
    images_per_maker: dict[str, dict[str, int]]  # split -> maker -> count
    source_revision: str
    seconds: float = 0.0
    cache_hit: bool = False
    corrupted_splits: list[str] = field(default_factory=list)
    dropped_duplicate: dict[str, int] = field(default_factory=dict)  # same pixels as an earlier row of the split
    # The first DROPPED_ROWS_SHOWN dropped rows: {"split", "index" (row in the raw split), "reason", "detail"};
    # all of them are in DROPPED_ROWS_FILE beside the data.
    dropped_rows: list[dict] = field(default_factory=list)
    # The labeled batches joined ({"batch_id", "split", "rows"}) and train/validation's makers before them.
    additions: list[dict] = field(default_factory=list)
    images_per_maker_before_additions: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def current(cls, store: PipelineStore) -> MakerDataset:
        """The record of the current car_maker_dataset (MissingUpstreamError when never materialized)."""
        return cls(**store.read_manifest(CAR_MAKER_DATASET))

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

    def all_dropped_rows(self) -> list[dict]:
        """Every dropped row (the record itself keeps the first DROPPED_ROWS_SHOWN)."""
        stored = Path(self.path) / DROPPED_ROWS_FILE
        return read_json(stored) if stored.exists() else list(self.dropped_rows)

    def counts_table(self) -> pd.DataFrame:
        """Images per maker (rows) and split (columns), with a total row."""
        frame = pd.DataFrame(self.images_per_maker).fillna(0).astype(int)
        frame = frame.reindex(index=self.makers, fill_value=0)
        frame.loc["total"] = frame.sum()
        return frame.rename_axis("maker").reset_index()

    def dropped_rows_heading(self) -> str:
        """How many rows were dropped, how many are listed, and where all of them are."""
        if not self.dropped_total:
            return "No row was dropped."
        shown = len(self.dropped_rows)
        return (
            f"{self.dropped_total} row(s) dropped"
            + (f"; the first {shown} shown" if shown < self.dropped_total else "")
            + f" (all in {Path(self.path) / DROPPED_ROWS_FILE})"
        )

    def dropped_rows_table(self) -> pd.DataFrame:
        """The listed dropped rows: split, row index, reason, detail."""
        return pd.DataFrame(self.dropped_rows, columns=["split", "index", "reason", "detail"])


def _check_raw(raw: datasets.DatasetDict) -> None:
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


def _counts(dropped: list[dict], splits, reasons: tuple[str, ...]) -> dict[str, int]:
    return {split: sum(1 for row in dropped if row["split"] == split and row["reason"] in reasons) for split in splits}


def build_maker_dataset(
    raw: datasets.DatasetDict,
    out_dir: Path,
    params: MakerDatasetParams = MakerDatasetParams(),
    source_revision: str = "unknown",
    additions: list[AddedBatch] = (),
) -> MakerDataset:
    """Collapse classes to makers, drop unusable rows (listing why), carve a stratified validation split,
    then append the labeled `additions` to train or validation (`provenance` names each row's batch)."""
    started = time.perf_counter()
    _check_raw(raw)
    # Every split's labels through its own names, onto one vocabulary: train's names first.
    splits_in_order = [TRAIN, *(split for split in raw if split != TRAIN)]
    class_names = unified_names([raw[split].features["label"].names for split in splits_in_order])
    makers_for_class_names(class_names)  # every unknown class name, reported at once
    parsed = [parse_class_name(name) for name in class_names]

    with atomic_directory(out_dir) as tmp:
        work = tmp / ".work"  # intermediate Arrow files of this build, removed before the rename
        cleaned, dropped = {}, []
        for split, part in raw.items():
            cleaned[split], dropped_here = clean_split(split, part, parsed, class_names, params.num_proc, work)
            dropped += dropped_here
            if cleaned[split].num_rows == 0:
                reasons = Counter(row["reason"] for row in dropped_here)
                raise MakerDatasetError(
                    f"Split {split!r} has no usable row left (dropped: {dict(reasons)}; first: {dropped_here[0]})."
                )
        result, makers = _with_makers_and_validation(cleaned, params)
        before = {split: rows_per_maker(result[split]) for split in (TRAIN, VALIDATION)}
        joined, dropped_additions = append_added_rows(
            dict(result), list(additions), result[TRAIN].features["maker_id"], class_names
        )
        result = datasets.DatasetDict(joined)
        dropped += dropped_additions
        result.save_to_disk(str(tmp))
        write_json_atomic(tmp / DROPPED_ROWS_FILE, dropped)
        record = MakerDataset(
            path=str(out_dir),
            makers=makers,
            rows_per_split={name: part.num_rows for name, part in result.items()},
            dropped_undecodable=_counts(dropped, raw, (UNDECODABLE, TOO_LARGE)),
            dropped_bad_label=_counts(dropped, raw, (BAD_LABEL,)),
            dropped_duplicate=_counts(dropped, raw, (DUPLICATE,)),
            images_per_maker={name: dict(Counter(column(part, "maker"))) for name, part in result.items()},
            source_revision=source_revision,
            corrupted_splits=[name for name in result if name not in (TRAIN, VALIDATION, TEST)],
            dropped_rows=dropped[:DROPPED_ROWS_SHOWN],
            additions=[
                {
                    "batch_id": b.batch_id,
                    "split": b.split,
                    "rows": column(result[b.split], "provenance").count(b.batch_id),
                }
                for b in additions
            ],
            images_per_maker_before_additions=before if additions else {},
        )
        write_json_atomic(tmp / _COMPLETE, record.to_json())
        shutil.rmtree(work)
    record.seconds = time.perf_counter() - started
    return record


def _with_makers_and_validation(
    cleaned: dict[str, datasets.Dataset], params: MakerDatasetParams
) -> tuple[datasets.DatasetDict, list[str]]:
    """Add the maker_id ClassLabel and carve a validation split out of train, stratified by maker."""
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
    return datasets.DatasetDict(ordered), makers


def load_stored_maker_dataset(out_dir: Path) -> MakerDataset | None:
    """The record of a complete stored build, or None when absent or half-written."""
    marker = out_dir / _COMPLETE
    if not marker.exists():
        return None
    record = MakerDataset(**read_json(marker))
    record.cache_hit = True
    return record
