"""The raw source: Stanford Cars from the Hub, or a local copy with the same layout.

The source is pinned to a revision (the Hub commit, or a content fingerprint of a local folder) and
stored under that revision as Arrow, so materializing again with an unchanged source reuses the
stored copy. A Hub dataset goes through `datasets.load_dataset` at its pinned commit; a local
folder is read file by file (`local_source`), so the stored copy is always the content its
fingerprint names, never a cached earlier content of the same path.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from car_maker_pipeline.data.local_source import local_fingerprint, store_local_source
from car_maker_pipeline.data.source_schema import SourceError, validate_source
from car_maker_pipeline.storage import atomic_directory, read_json, remove_stale_temporaries, write_json_atomic
from car_maker_pipeline.store import RAW_STANFORD_CARS, PipelineStore

_COMPLETE = "_SOURCE_COMPLETE.json"


@dataclass(frozen=True)
class RawDataset:
    path: str  # the stored Arrow DatasetDict (datasets.load_from_disk)
    source: str
    revision: str
    rows_per_split: dict[str, int]
    class_names: list[str]
    cache_hit: bool
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # local source: relative path -> sha256 of what was stored

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def current(cls, store: PipelineStore) -> RawDataset:
        """The record of the current raw_stanford_cars (MissingUpstreamError when never materialized)."""
        return cls(**store.read_manifest(RAW_STANFORD_CARS))

    def load(self) -> datasets.DatasetDict:
        return datasets.load_from_disk(self.path)


def _looks_local(path_or_id: str) -> bool:
    return path_or_id.startswith(("/", "./", "../", "~")) or Path(path_or_id).exists()


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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name).strip("_") or "source"


def materialize_raw(path_or_id: str, home: Path, revision: str | None = None, token: str | None = None) -> RawDataset:
    """Load every split of the source and store it under its revision; reuse the stored copy if present."""
    started = time.perf_counter()
    local = _looks_local(path_or_id)
    resolved = resolve_revision(path_or_id, revision)
    target = home / "raw_stanford_cars" / _safe(Path(path_or_id).name if local else path_or_id) / _safe(resolved)
    # A failed or killed earlier write left its temporary here; a run that only reuses the store clears it too.
    remove_stale_temporaries(target.parent)
    if (target / _COMPLETE).exists():
        record = read_json(target / _COMPLETE)
        record.update(cache_hit=True, seconds=time.perf_counter() - started)
        return RawDataset(**record)

    with atomic_directory(target) as tmp:
        if local:
            stored = store_local_source(Path(path_or_id).expanduser(), path_or_id, resolved, tmp)
            rows_per_split, class_names, files = stored.rows_per_split, stored.class_names, stored.files
        else:
            dataset = _load_hub(path_or_id, resolved, token, home)
            dataset.save_to_disk(str(tmp))
            rows_per_split = {split: part.num_rows for split, part in dataset.items()}
            class_names, files = list(next(iter(dataset.values())).features["label"].names), {}
        record = RawDataset(
            path=str(target),
            source=path_or_id,
            revision=resolved,
            rows_per_split=rows_per_split,
            class_names=class_names,
            cache_hit=False,
            seconds=0.0,
            files=files,
        ).to_json()
        write_json_atomic(tmp / _COMPLETE, record)  # last: its presence means the copy is whole
    record.update(seconds=time.perf_counter() - started)
    return RawDataset(**record)


def _load_hub(repo_id: str, commit: str, token: str | None, home: Path) -> datasets.DatasetDict:
    """The Hub dataset at its pinned commit (the download cache is keyed by that commit, so it cannot go stale)."""
    try:
        dataset = datasets.load_dataset(
            repo_id, revision=commit, token=token, cache_dir=str(home / "hf_datasets_cache")
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(error))
        if empty:  # how `datasets` reports a split file with no rows
            raise SourceError(
                f"Split {empty.group(1)!r} of source {repo_id!r} is empty; every split needs rows."
            ) from error
        cause = error.__cause__ or error  # DatasetGenerationError hides the reason in its cause
        raise SourceError(f"Could not load source {repo_id!r} at {commit}: {type(cause).__name__}: {cause}") from error
    validate_source(dataset, repo_id)
    return dataset
