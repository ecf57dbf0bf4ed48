"""One parquet file of a local source, checked and staged as Arrow a batch of rows at a time.

Why batches: a split of real-size photos is gigabytes in one file, and reading the file whole (its
bytes, then its table, then the cast copy) held three copies of it (10.5 GB at the real dataset's
size, measured). The file is copied into the staging folder while it is hashed, in chunks, and the
copy is what gets parsed, so what is stored is still exactly what the revision fingerprint covers.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.table import cast_table_to_features

from car_maker_pipeline.data.source_schema import SourceError, check_features

BATCH_ROWS = 256  # rows staged at a time: memory holds one batch of a file, not the file
REPLACE = (
    "Replace it with a complete copy (copy or download it again, or regenerate the source), then materialize again."
)


def copy_hashing(source: Path, target: Path | None, *digests) -> None:
    """Feed `source`'s bytes to every digest in 1 MiB chunks, copying them to `target` if given.

    The copy is what gets parsed, so what is stored is exactly what was hashed (a file changed
    meanwhile cannot slip in), and memory holds one chunk, not the file.
    """
    with source.open("rb") as handle, target.open("wb") if target else contextlib.nullcontext() as copy:
        while chunk := handle.read(1 << 20):
            for digest in digests:
                digest.update(chunk)
            if copy is not None:
                copy.write(chunk)


def open_parquet(path: Path, where: str) -> pq.ParquetFile:
    size = path.stat().st_size
    if not size:
        raise SourceError(f"{where} is empty (0 bytes), not a parquet file. {REPLACE}")
    with path.open("rb") as handle:
        head = handle.read(4)
        handle.seek(max(size - 4, 0))
        tail = handle.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise SourceError(
            f"{where} is cut short or is not parquet: {size:,} bytes without the parquet header and footer "
            f"(an interrupted copy or download?). {REPLACE}"
        )
    try:
        return pq.ParquetFile(str(path), memory_map=True)
    except (pa.ArrowException, OSError) as error:
        raise _damaged(where, error) from error


def _damaged(where: str, error: Exception) -> SourceError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return SourceError(f"{where} is damaged: parquet cannot read it ({reason}). {REPLACE}")


def _features(schema: pa.Schema, card: datasets.Features | None, where: str) -> datasets.Features:
    """What each column is declared to be: by the file's own schema metadata (written by `to_parquet`),
    else by the dataset card, else by its Arrow type. Declared, not inferred: a ClassLabel column stored
    as class-name strings or floats is still a ClassLabel (its values are checked in `_label_ids`)."""
    declared = card or datasets.Features()
    metadata = (schema.metadata or {}).get(b"huggingface")
    try:
        if metadata is not None:
            declared = datasets.Features.from_dict(json.loads(metadata)["info"]["features"])
        inferred = datasets.Features.from_arrow_schema(schema.remove_metadata())
    except (ValueError, KeyError, TypeError) as error:  # malformed `huggingface` schema metadata
        raise SourceError(f"{where} has unreadable feature metadata in its schema ({error!r}). {REPLACE}") from error
    return datasets.Features({name: declared.get(name, feature) for name, feature in inferred.items()})


def _label_ids(column: pa.ChunkedArray, names: list[str], where: str) -> pa.Array:
    """The label column as int64 ids of the file's own class names: from ids, whole floats or class names."""
    kind = column.type
    if pa.types.is_integer(kind):
        try:
            return column.cast(pa.int64())
        except pa.ArrowInvalid as error:  # an unsigned id beyond int64
            raise SourceError(f"{where} has label ids no class list can hold ({error}).") from error
    if pa.types.is_floating(kind):
        values = column.to_numpy().astype(float)  # nulls read as NaN
        valid = column.is_valid().to_numpy()
        bad = valid & ~(np.isfinite(values) & (values == np.round(values)))
        if bad.any():
            examples = ", ".join(f"row {row}: {float(values[row])!r}" for row in np.flatnonzero(bad)[:5])
            raise SourceError(
                f"{where} has {int(bad.sum())} label(s) that are not whole class ids ({examples}). Labels are "
                f"ids 0..{len(names) - 1} of the file's ClassLabel, or its class names; fix the label column, "
                "then materialize again."
            )
        return pa.array(np.where(valid, values, 0).astype(np.int64), mask=~valid)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        position = {name: index for index, name in enumerate(names)}
        values = column.to_pylist()
        unknown = Counter(value for value in values if value is not None and value not in position)
        if unknown:
            raise SourceError(
                f"{where} has {sum(unknown.values())} label(s) naming no class of its ClassLabel: "
                f"{sorted(unknown)[:5]} (its {len(names)} classes start {names[:3]}). Use the exact class "
                "names or their ids, then materialize again."
            )
        return pa.array([None if value is None else position[value] for value in values], pa.int64())
    raise SourceError(f"{where} has a label column of type {kind}, neither class ids nor class names.")


@dataclass
class Staged:
    split: str
    where: str
    names: list[str]  # the file's own class names, which its label ids index
    features: datasets.Features
    path: Path  # the file's rows as Arrow IPC under the staging folder


def stage(parquet: pq.ParquetFile, split: str, where: str, source: str, card, path: Path) -> Staged:
    """Check one parquet file, turn its labels into ids of its own names, and write it to `path` as Arrow,
    a batch of rows at a time (the label column alone is read whole, to check it in one go)."""
    features = _features(parquet.schema_arrow, card, where)
    check_features(features, parquet.schema_arrow.names, split, source, where)
    names = list(features["label"].names)
    try:
        labels = _label_ids(parquet.read(columns=["label"])["label"], names, where)
        path_only, offset = 0, 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, features.arrow_schema) as writer:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                table = pa.Table.from_batches([batch])
                table = table.set_column(
                    table.column_names.index("label"), "label", labels.slice(offset, table.num_rows)
                )
                offset += table.num_rows
                try:
                    table = cast_table_to_features(table.replace_schema_metadata(None), features)
                except (ValueError, TypeError, pa.ArrowException) as error:
                    raise SourceError(f"{where} does not match its declared features ({error}). {REPLACE}") from error
                path_only += _path_only_images(table)
                writer.write_table(table)
    except (pa.ArrowException, OSError) as error:  # a row group that cannot be read
        raise _damaged(where, error) from error
    if path_only:
        raise SourceError(
            f"{where} has {path_only} image(s) stored as a file path without their bytes; the revision "
            "fingerprint covers the source folder only, so their content could change unseen. Embed the "
            "image bytes (datasets' `embed_external_files`), then materialize again."
        )
    return Staged(split, where, names, features, path)


def _path_only_images(table: pa.Table) -> int:
    return sum(
        pc.sum(pc.and_(pc.is_null(chunk.field("bytes")), pc.is_valid(chunk.field("path")))).as_py() or 0
        for chunk in table["image"].chunks
    )
