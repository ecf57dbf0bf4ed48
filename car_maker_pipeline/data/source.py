"""The raw source: Stanford Cars from the Hub, or a local copy with the same layout.

Both go through `datasets.load_dataset(path_or_repo_id)`. The source is pinned to a revision
(the Hub commit, or a content fingerprint of a local folder) and stored under that revision as
Arrow, so materializing again with an unchanged source reuses the stored copy.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from car_maker_pipeline.storage import atomic_directory, read_json, write_json_atomic

REQUIRED_COLUMNS = ("image", "label")
_COMPLETE = "_SOURCE_COMPLETE.json"


class SourceError(ValueError):
    """The source dataset is missing, unreachable or not shaped like Stanford Cars."""


@dataclass(frozen=True)
class RawDataset:
    path: str  # the stored Arrow DatasetDict (datasets.load_from_disk)
    source: str
    revision: str
    rows_per_split: dict[str, int]
    class_names: list[str]
    cache_hit: bool
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)

    def load(self) -> datasets.DatasetDict:
        return datasets.load_from_disk(self.path)


def _looks_local(path_or_id: str) -> bool:
    return path_or_id.startswith(("/", "./", "../", "~")) or Path(path_or_id).exists()


def local_fingerprint(folder: Path) -> str:
    """sha256 over every non-hidden file's relative path and bytes: changes when any data changes."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise SourceError(
            f"The source folder {folder} holds no files. Point the source at a Stanford-Cars-shaped folder (data/<split>-*.parquet)."
        )
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:16]


def resolve_revision(path_or_id: str, revision: str | None = None, timeout_s: float = 10.0) -> str:
    """The exact version that will be loaded: a content fingerprint locally, the commit sha on the Hub."""
    if _looks_local(path_or_id):
        folder = Path(path_or_id).expanduser()
        if not folder.is_dir():
            raise SourceError(
                f"The source path {path_or_id!r} does not exist. Point it at a local copy of "
                "Stanford Cars (data/<split>-*.parquet), or use the demo profile (CAR_MAKER_PROFILE=demo)."
            )
        return local_fingerprint(folder)
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(path_or_id, revision=revision, timeout=timeout_s)
    except Exception as error:  # offline mode, DNS failure, refused connection, 404, gated...
        raise SourceError(
            f"Could not reach the Hugging Face Hub for dataset {path_or_id!r} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Without network access, use the offline demo profile (CAR_MAKER_PROFILE=demo, the default), "
            "or point the source at a local copy of the dataset (a folder with data/<split>-*.parquet)."
        ) from error
    return info.sha


def validate_source(dataset: datasets.DatasetDict, source: str) -> None:
    """Stanford-Cars shape: an image column, a ClassLabel label column, no empty split."""
    if not dataset:
        raise SourceError(f"The source {source!r} has no splits.")
    for split, part in dataset.items():
        missing = [column for column in REQUIRED_COLUMNS if column not in part.column_names]
        if missing:
            raise SourceError(
                f"Split {split!r} of source {source!r} lacks column(s) {missing}; it has {part.column_names}. "
                "A Stanford-Cars-shaped source has an 'image' column and a 'label' ClassLabel column."
            )
        if not isinstance(part.features["label"], datasets.ClassLabel):
            raise SourceError(
                f"Column 'label' of split {split!r} in source {source!r} is {part.features['label']!r}, "
                "not a ClassLabel; the class names (make, model, year) are needed to derive makers."
            )
        if not isinstance(part.features["image"], datasets.Image):
            raise SourceError(f"Column 'image' of split {split!r} in source {source!r} is not an Image feature.")
        if part.num_rows == 0:
            raise SourceError(f"Split {split!r} of source {source!r} is empty; every split needs rows.")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name).strip("_") or "source"


def materialize_raw(path_or_id: str, home: Path, revision: str | None = None, token: str | None = None) -> RawDataset:
    """Load every split of the source and store it under its revision; reuse the stored copy if present."""
    started = time.perf_counter()
    resolved = resolve_revision(path_or_id, revision)
    target = (
        home
        / "raw_stanford_cars"
        / _safe(path_or_id if not _looks_local(path_or_id) else Path(path_or_id).name)
        / _safe(resolved)
    )
    if (target / _COMPLETE).exists():
        record = read_json(target / _COMPLETE)
        record.update(cache_hit=True, seconds=time.perf_counter() - started)
        return RawDataset(**record)

    load_kwargs = {"cache_dir": str(home / "hf_datasets_cache")}
    if not _looks_local(path_or_id):
        load_kwargs.update(revision=resolved, token=token)
    try:
        dataset = datasets.load_dataset(
            str(Path(path_or_id).expanduser()) if _looks_local(path_or_id) else path_or_id, **load_kwargs
        )
    except (FileNotFoundError, ValueError) as error:
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(error))
        if empty:  # how `datasets` reports a split file with no rows
            raise SourceError(
                f"Split {empty.group(1)!r} of source {path_or_id!r} is empty; every split needs rows."
            ) from error
        raise SourceError(f"Could not load source {path_or_id!r}: {error}") from error
    validate_source(dataset, path_or_id)

    with atomic_directory(target) as tmp:
        dataset.save_to_disk(str(tmp))
        record = RawDataset(
            path=str(target),
            source=path_or_id,
            revision=resolved,
            rows_per_split={split: part.num_rows for split, part in dataset.items()},
            class_names=list(next(iter(dataset.values())).features["label"].names),
            cache_hit=False,
            seconds=0.0,
        ).to_json()
        write_json_atomic(tmp / _COMPLETE, record)  # last: its presence means the copy is whole
    record.update(seconds=time.perf_counter() - started)
    return RawDataset(**record)
