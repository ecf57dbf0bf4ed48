"""Hand-made Stanford-Cars-shaped parquet files: any label type, any class names per file, or no metadata.

`datasets.Dataset.to_parquet` can only write what `datasets` itself accepts; a source from elsewhere
can hold class-name strings, floats or another split's class order, so these files are written with
pyarrow directly, with the same `huggingface` schema metadata `to_parquet` writes when names are given.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from car_maker_pipeline.data.classes import stanford_cars_class_names

NAMES = list(stanford_cars_class_names())
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def photo(seed: int, size=(24, 16), fmt: str = "PNG") -> bytes:
    """A small random picture: distinct seeds give distinct pixels (no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def hf_metadata(names: list[str]) -> dict[bytes, bytes]:
    features = {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_parquet(
    path: Path,
    images: list[bytes | None],
    labels: list,
    names: list[str] | None,
    label_type: pa.DataType | None = None,
    compression: str = "snappy",
) -> Path:
    """One split file; `names` None writes no feature metadata (as pandas or plain pyarrow would)."""
    table = pa.table(
        {
            "image": pa.array([None if b is None else {"bytes": b, "path": None} for b in images], IMAGE_TYPE),
            "label": pa.array(labels, label_type),
        }
    )
    if names is not None:
        table = table.replace_schema_metadata(hf_metadata(names))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression=compression)
    return path


def split_path(folder: Path, split: str, shard: int = 0, shards: int = 1) -> Path:
    return folder / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"


def write_classes(folder: Path, split: str, rows: list[tuple[bytes, str]], names: list[str], shard=0, shards=1) -> Path:
    """A split whose rows are (image, class name), labelled with ids of this file's own `names`."""
    return write_parquet(
        split_path(folder, split, shard, shards), [b for b, _ in rows], [names.index(c) for _, c in rows], names
    )


def stored_class_names(part) -> list[str]:
    """The class name of every row of a stored split, read through that split's own ClassLabel."""
    names = part.features["label"].names
    return [names[label] for label in part.with_format("arrow")["label"].to_pylist()]


def image_bytes(part) -> list[bytes]:
    return [cell["bytes"] for cell in part.with_format("arrow")["image"].to_pylist()]


AUDI, BMW = NAMES.index("Audi A5 Coupe 2012"), NAMES.index("BMW M3 Coupe 2012")


def make_source(folder: Path, seed: int, rows: int = 4, fmt: str = "PNG", compression: str = "snappy") -> Path:
    """train and test splits of `rows` distinct pictures each; `seed` decides the pictures."""
    for split, offset in (("train", 0), ("test", 1000)):
        images = [photo(seed * 10_000 + offset + i, fmt=fmt) for i in range(rows)]
        write_parquet(split_path(folder, split), images, [AUDI, BMW] * (rows // 2), NAMES, compression=compression)
    return folder


def temporaries(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if ".tmp-" in p.name or p.name in (".staging", ".work")]
