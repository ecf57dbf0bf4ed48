"""Class vocabularies per split: a split's integer labels mean what its own ClassLabel names say.

Each parquet split carries its own ClassLabel names in its schema. A split written with the names
in another order, or with fewer or more of them, uses other integers for the same classes; reading
it with another split's names silently gives its images the wrong class, and even the wrong maker.
So every split is mapped through its own names onto one vocabulary: train's names first, then any
name that only other splits list, in order of appearance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

INVALID_LABEL = -1  # what an id outside its own split's names becomes once mapped (a bad label, dropped later)


def unified_names(vocabularies: Sequence[Sequence[str]]) -> list[str]:
    """One vocabulary holding every name once: the first vocabulary's order, then names new to later ones."""
    names: list[str] = []
    seen: set[str] = set()
    for vocabulary in vocabularies:
        for name in vocabulary:
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def label_mapping(own: Sequence[str], unified: Sequence[str]) -> np.ndarray | None:
    """own id -> unified id, or None when the two lists are identical (the ids already agree)."""
    if list(own) == list(unified):
        return None
    position = {name: index for index, name in enumerate(unified)}
    return np.array([position[name] for name in own], dtype=np.int64)


def map_label(label: int | None, own_size: int, mapping: np.ndarray | None) -> int | None:
    """One label into the unified vocabulary; None stays None, an id outside its own names is INVALID_LABEL."""
    if label is None:
        return None
    if not 0 <= int(label) < own_size:
        return INVALID_LABEL if mapping is not None else int(label)
    return int(mapping[int(label)]) if mapping is not None else int(label)


def map_label_column(labels: pa.ChunkedArray, mapping: np.ndarray | None) -> pa.ChunkedArray:
    """`map_label` over an int64 Arrow column (nulls kept)."""
    if mapping is None:
        return labels
    in_range = pc.and_(pc.greater_equal(labels, 0), pc.less(labels, len(mapping)))
    mapped = pc.take(pa.array(mapping), pc.if_else(in_range, labels, 0))
    return pc.if_else(in_range, mapped, pa.scalar(INVALID_LABEL, pa.int64()))
