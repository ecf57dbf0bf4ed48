"""A local Stanford-Cars-shaped folder, read file by file, so that what is stored is what was fingerprinted.

`datasets.load_dataset(folder)` is not used for local folders: its cache is keyed by the folder and
file metadata rather than content, so a parquet file changed in place, a second folder with the same
file names or a `data/` symlink pointed elsewhere was served from the cache under the new revision;
and it reads every split with one split's ClassLabel names. Here every file is hashed as it is read
(the same sha256 as the revision fingerprint, so a folder that changes meanwhile is noticed), each
file's labels are mapped through its own names (`labels`), and a damaged file is named with its split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import yaml
from datasets.arrow_writer import ArrowWriter

from car_maker_pipeline.data.labels import label_mapping, map_label_column, unified_names
from car_maker_pipeline.data.source_schema import SourceError, validate_source
from car_maker_pipeline.data.staging import Staged, copy_hashing, open_parquet, stage

DATA_SUFFIX = ".parquet"
DOCUMENTATION_SUFFIXES = (".md",)  # a dataset card matched by a broad pattern is not data


def source_files(folder: Path) -> list[str]:
    """Every non-hidden file under `folder` (relative POSIX paths, sorted), following symlinked folders once."""
    found: list[str] = []
    visited: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = os.stat(root)
        if (here.st_dev, here.st_ino) in visited:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        visited.add((here.st_dev, here.st_ino))
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        relative_root = Path(root).relative_to(folder)
        for name in files:
            if not name.startswith(".") and (Path(root) / name).is_file():
                found.append((relative_root / name).as_posix())
    return sorted(found)


def fingerprint_update(digest, relative: str, data: bytes) -> None:
    """The revision fingerprint is sha256 over each file's relative path then bytes, in sorted path order."""
    digest.update(relative.encode())
    digest.update(data)


def fingerprint_value(digest) -> str:
    return "sha256-" + digest.hexdigest()[:16]


def local_fingerprint(folder: Path) -> str:
    """sha256 over every non-hidden file's relative path and bytes (symlinked folders followed): changes
    when any data changes."""
    digest = hashlib.sha256()
    files = source_files(folder)
    if not files:
        raise SourceError(
            f"The source folder {folder} holds no files. Point the source at a Stanford-Cars-shaped folder (data/<split>-*.parquet)."
        )
    for name in files:
        fingerprint_update(digest, name, b"")
        copy_hashing(folder / name, None, digest)
    return fingerprint_value(digest)


def _card(folder: Path) -> dict:
    """The YAML front matter of the folder's README.md (the Hub dataset card), or {}."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return front if isinstance(front, dict) else {}


def _default_entry(entries, key: str = "config_name"):
    """The `default` config of a card section that may list several, or its only one."""
    if isinstance(entries, dict) or not entries:
        return entries or {}
    return next((entry for entry in entries if entry.get(key) == "default"), entries[0])


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def split_patterns(folder: Path, card: dict) -> dict[str, list[str]]:
    """Split -> file patterns: the card's `configs` when it has them, else `datasets`' own inference."""
    config = _default_entry(card.get("configs") or [])
    data_files = config.get("data_files") if isinstance(config, dict) else None
    if isinstance(data_files, dict):
        return {split: _as_list(paths) for split, paths in data_files.items()}
    if data_files and all(isinstance(entry, dict) for entry in data_files):
        return {entry["split"]: _as_list(entry["path"]) for entry in data_files}
    if data_files:
        return {"train": _as_list(data_files)}
    from datasets.data_files import EmptyDatasetError, get_data_patterns

    try:
        return get_data_patterns(str(folder))
    except EmptyDatasetError as error:
        raise SourceError(
            f"The source folder {folder} holds no data files. Point the source at a Stanford-Cars-shaped "
            "folder (data/<split>-*.parquet)."
        ) from error


def _glob_match(pattern: list[str], path: list[str]) -> bool:
    """Glob semantics of the Hub's data_files: `*` stays within a folder, `**` spans any number of them."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, path[index:]) for index in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], head) and _glob_match(rest, path[1:])


def split_files(folder: Path, files: list[str], source: str) -> dict[str, list[str]]:
    """Split -> its parquet files (sorted); each data file belongs to exactly one split."""
    owner: dict[str, str] = {}
    result: dict[str, list[str]] = {}
    for split, patterns in split_patterns(folder, _card(folder)).items():
        parts = [pattern.removeprefix("./").split("/") for pattern in patterns]
        matched = [f for f in files if any(_glob_match(p, f.split("/")) for p in parts)]
        matched = [f for f in matched if not f.endswith(DOCUMENTATION_SUFFIXES)]
        others = [f for f in matched if not f.endswith(DATA_SUFFIX)]
        if others:
            raise SourceError(
                f"Split {split!r} of source {source!r} has data files that are not parquet: {others[:5]}. "
                "A local source is read as parquet (data/<split>-*.parquet, as on the Hub); convert them or "
                "move them out of the folder."
            )
        if not matched:
            raise SourceError(
                f"No parquet file of source {source!r} matches split {split!r} (patterns {patterns}); "
                "add its files, or remove the split from the data_files of README.md."
            )
        for name in matched:
            if name in owner:
                raise SourceError(
                    f"{name} in source {source!r} matches both split {owner[name]!r} and split {split!r}; "
                    "rename it, or give the splits non-overlapping data_files in README.md."
                )
            owner[name] = split
        result[split] = matched
    return result


def _assemble(
    split: str, staged: list[Staged], label: datasets.ClassLabel, source: str, work: Path
) -> datasets.Dataset:
    """One split from its staged files, every label mapped into the unified vocabulary `label`.

    Written batch by batch to one Arrow file under `work` and opened memory-mapped: building it as
    one in-memory table held a copy of the whole split (6.7 GB for the real dataset's train split).
    """
    features = None
    for item in staged:
        own = datasets.Features({**item.features, "label": label})
        if features is not None and own != features:
            raise SourceError(
                f"The files of split {split!r} of source {source!r} disagree on their columns: {item.where} "
                f"has {own}, an earlier file of the split has {features}. Give every file of a split the same "
                "columns, then materialize again."
            )
        features = own
    path = work / f"{split}.arrow"
    with ArrowWriter(features=features, path=str(path)) as writer:
        for item in staged:
            mapping = label_mapping(item.names, label.names)
            reader = pa.ipc.open_file(pa.memory_map(str(item.path)))
            for index in range(reader.num_record_batches):
                table = pa.Table.from_batches([reader.get_batch(index)])
                ids = map_label_column(table["label"], mapping)
                writer.write_table(table.set_column(table.column_names.index("label"), "label", ids))
        writer.finalize()
    return datasets.Dataset.from_file(
        str(path), info=datasets.DatasetInfo(features=features), split=datasets.NamedSplit(split)
    )


@dataclass(frozen=True)
class StoredLocalSource:
    rows_per_split: dict[str, int]
    class_names: list[str]
    files: dict[str, str]  # relative path -> sha256 of the bytes that were read and stored


def store_local_source(folder: Path, source: str, revision: str, out_dir: Path) -> StoredLocalSource:
    """Read every file of `folder` once, check that it hashes to `revision`, and save the splits to `out_dir`.

    Labels of every file are mapped through its own ClassLabel names onto one vocabulary (train's
    first). Each file is copied (and hashed) into `out_dir`'s staging folder in chunks, then staged as
    Arrow a batch of rows at a time, so memory holds one batch, not a file (a split of real-size photos
    is gigabytes); each split is assembled batch by batch into a memory-mapped Arrow file and saved from it.
    """
    files = source_files(folder)
    splits = split_files(folder, files, source)
    split_of = {name: split for split, names in splits.items() for name in names}
    card_info = _default_entry(_card(folder).get("dataset_info") or {})
    card = datasets.Features._from_yaml_list(card_info["features"]) if card_info.get("features") else None
    staging = out_dir / ".staging"
    staging.mkdir(parents=True)
    digest, hashes, staged = hashlib.sha256(), {}, []
    for name in files:
        own = hashlib.sha256()
        fingerprint_update(digest, name, b"")
        copy = staging / f"{len(staged):05d}.parquet" if name in split_of else None
        copy_hashing(folder / name, copy, digest, own)
        hashes[name] = own.hexdigest()
        if copy is not None:
            where = f"Split {split_of[name]!r}, file {folder / name}"
            staged.append(
                stage(open_parquet(copy, where), split_of[name], where, source, card, copy.with_suffix(".arrow"))
            )
            copy.unlink()
    if fingerprint_value(digest) != revision:
        raise SourceError(
            f"The source folder {folder} changed while it was being read (fingerprint {revision} before, "
            f"{fingerprint_value(digest)} while reading). Materialize again once nothing is writing to it."
        )
    train_first = [s for s in staged if s.split == "train"] + [s for s in staged if s.split != "train"]
    label = datasets.ClassLabel(names=unified_names([item.names for item in train_first]))
    dataset = datasets.DatasetDict(
        {split: _assemble(split, [s for s in staged if s.split == split], label, source, staging) for split in splits}
    )
    validate_source(dataset, source)
    dataset.save_to_disk(str(out_dir))
    shutil.rmtree(staging)
    return StoredLocalSource(
        rows_per_split={split: part.num_rows for split, part in dataset.items()}, class_names=label.names, files=hashes
    )
