"""One split of the demo source as a parquet file, written and read a row group at a time.

Why: at the real dataset's scale with realistic picture sizes a split's encoded images run to
gigabytes; collecting them in a list and building one Arrow table (as `Dataset.from_dict(...)
.to_parquet()` does) held all of them, twice, before the first byte was written. `datasets`' own
`ParquetWriter` writes what `to_parquet` writes (the features in the schema metadata, the same
column options and row-group size for image columns), one row group as it fills.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.arrow_writer import ParquetWriter
from datasets.io.parquet import get_writer_batch_size_from_features


class SplitFile:
    """A split's parquet file, rows added one at a time; memory holds one row group of them.

    Once closed, `counts` is (rows, Arrow bytes), what the dataset card records for the split.
    """

    def __init__(self, path: Path, features: datasets.Features):
        self.path = Path(path)
        self.counts: tuple[int, int] | None = None
        self.writer = ParquetWriter(
            features=features,
            path=str(self.path),
            writer_batch_size=get_writer_batch_size_from_features(features) or 100,
        )

    def add(self, data: bytes, label: int) -> None:
        self.writer.write({"image": {"bytes": data, "path": None}, "label": label})

    def __enter__(self) -> SplitFile:
        return self

    def __exit__(self, *_) -> None:
        self.counts = self.writer.finalize()


def read_split_file(path: Path) -> Iterator[tuple[bytes, int]]:
    """(encoded image, label) of every row, in order, one row group in memory at a time."""
    for batch in pq.ParquetFile(path).iter_batches(columns=["image", "label"], batch_size=100):
        for cell, label in zip(batch.column("image").to_pylist(), batch.column("label").to_pylist()):
            yield cell["bytes"], label
