"""Every split's labels are read through its own class names, in the raw copy and in the maker dataset.

Each case writes train with the 196 Stanford Cars names in their usual order and another split
with its own ClassLabel, labelling every row with the id its own names give the intended class.
The stored raw copy must name the intended class for every row, and the maker dataset the intended
maker: before, test was silently read with train's names.

| test split's own class names                         | expected                                                        |
|------------------------------------------------------|-----------------------------------------------------------------|
| reversed                                             | every row keeps its class; one vocabulary, train's order          |
| shuffled (seeded)                                    | same                                                              |
| a subset (only its own classes, in another order)    | same                                                              |
| a superset (train's plus two names train lacks, first) | same; the two extra names appended to the vocabulary           |
| two train shards in different orders                 | same, for both shards                                             |
| corrupted copy of test (contrast) in its own order   | same                                                              |
| README card lists the usual order, file says reversed | the file's own names win (they are what its ids were written with) |
| file without metadata, card declares the names        | the card's names are used                                         |
| DatasetDict given straight to build_maker_dataset      | each split mapped through its own names (no raw step involved)   |
| an id outside its own split's names                   | a bad label: dropped and counted, never another class           |
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import yaml

from car_maker_pipeline.data.maker_dataset import MakerDatasetError, MakerDatasetParams, build_maker_dataset
from car_maker_pipeline.data.makers import parse_class_name
from car_maker_pipeline.data.source import materialize_raw
from car_maker_pipeline_tests.support.sources import (
    NAMES,
    photo,
    split_path,
    stored_class_names,
    write_classes,
    write_parquet,
)

# Four classes of each of four makers, so a wrong id lands on another class and usually another maker.
CLASSES = [name for m in ("Audi", "BMW", "Chevrolet", "Dodge") for name in [n for n in NAMES if n.startswith(m)][:4]]
TRAIN_ROWS = [(photo(i), CLASSES[i % len(CLASSES)]) for i in range(48)]
TEST_ROWS = [(photo(1000 + i), CLASSES[(i * 7) % len(CLASSES)]) for i in range(16)]
EXTRA = ["Rolls-Royce Silver Shadow Sedan 1970", "Tesla Roadster Convertible 2010"]  # not among the 196


def vocabulary_of(kind: str) -> list[str]:
    if kind == "reversed":
        return NAMES[::-1]
    if kind == "shuffled":
        return [NAMES[i] for i in np.random.default_rng(7).permutation(len(NAMES))]
    if kind == "subset":
        return sorted({name for _, name in TEST_ROWS}, reverse=True)
    if kind == "superset":
        return EXTRA + NAMES
    raise ValueError(kind)


def maker(name: str) -> str:
    return parse_class_name(name).maker


def _build(raw, tmp_path):
    return build_maker_dataset(raw, tmp_path / "built", MakerDatasetParams(validation_fraction=0.25, num_proc=1))


@pytest.mark.parametrize("kind", ["reversed", "shuffled", "subset", "superset"])
def test_a_test_split_with_its_own_class_order_keeps_its_classes(tmp_path, kind):
    folder = tmp_path / "stanford_cars"
    test_rows = TEST_ROWS + ([(photo(2000), EXTRA[0]), (photo(2001), EXTRA[1])] if kind == "superset" else [])
    write_classes(folder, "train", TRAIN_ROWS, NAMES)
    write_classes(folder, "test", test_rows, vocabulary_of(kind))

    raw = materialize_raw(str(folder), tmp_path / "home")
    stored = raw.load()
    assert stored_class_names(stored["test"]) == [name for _, name in test_rows]
    assert stored_class_names(stored["train"]) == [name for _, name in TRAIN_ROWS]
    expected_vocabulary = NAMES + (EXTRA if kind == "superset" else [])
    assert raw.class_names == expected_vocabulary
    assert all(part.features["label"].names == expected_vocabulary for part in stored.values())

    if kind == "superset":  # the extra classes keep their makers, which have no training images
        with pytest.raises(MakerDatasetError, match=r"\['Rolls-Royce', 'Tesla'\] have fewer than 2 training images"):
            _build(stored, tmp_path)
        return
    built = _build(stored, tmp_path)
    data = built.load()
    assert list(data["test"]["maker"]) == [maker(name) for _, name in test_rows]
    assert list(data["test"]["source_class"]) == [name for _, name in test_rows]


def test_shards_and_corrupted_splits_each_use_their_own_names(tmp_path):
    folder = tmp_path / "stanford_cars"
    write_classes(folder, "train", TRAIN_ROWS[:24], NAMES, shard=0, shards=2)
    write_classes(folder, "train", TRAIN_ROWS[24:], NAMES[::-1], shard=1, shards=2)
    write_classes(folder, "test", TEST_ROWS, NAMES)
    contrast_rows = [(photo(3000 + i), name) for i, (_, name) in enumerate(TEST_ROWS)]
    write_classes(folder, "contrast", contrast_rows, vocabulary_of("shuffled"))

    stored = materialize_raw(str(folder), tmp_path / "home").load()
    assert stored_class_names(stored["train"]) == [name for _, name in TRAIN_ROWS]
    assert stored_class_names(stored["contrast"]) == [name for _, name in contrast_rows]
    data = _build(stored, tmp_path).load()
    assert list(data["contrast"]["maker"]) == [maker(name) for _, name in contrast_rows]


def _card(folder, names):
    card = {
        "dataset_info": {
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
            ]
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in ("train", "test")],
            }
        ],
    }
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n\n# a card\n")


def test_a_file_s_own_names_win_over_the_card_and_the_card_names_bare_files(tmp_path):
    folder = tmp_path / "own_names"
    write_classes(folder, "train", TRAIN_ROWS, NAMES)
    write_classes(folder, "test", TEST_ROWS, NAMES[::-1])
    _card(folder, NAMES)  # says the usual order, for every split
    stored = materialize_raw(str(folder), tmp_path / "home").load()
    assert stored_class_names(stored["test"]) == [name for _, name in TEST_ROWS]

    bare = tmp_path / "bare"  # no schema metadata at all: ids mean what the card says
    write_parquet(split_path(bare, "train"), [b for b, _ in TRAIN_ROWS], [NAMES.index(n) for _, n in TRAIN_ROWS], None)
    write_parquet(split_path(bare, "test"), [b for b, _ in TEST_ROWS], [NAMES.index(n) for _, n in TEST_ROWS], None)
    _card(bare, NAMES)
    stored = materialize_raw(str(bare), tmp_path / "home").load()
    assert stored_class_names(stored["test"]) == [name for _, name in TEST_ROWS]
    assert isinstance(stored["test"].features["image"], datasets.Image)


def _split(rows, names):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [names.index(n) for _, n in rows]},
        features=features,
    )


@pytest.mark.parametrize("kind", ["reversed", "shuffled", "subset"])
def test_the_maker_step_maps_each_split_through_its_own_names(tmp_path, kind):
    raw = datasets.DatasetDict({"train": _split(TRAIN_ROWS, NAMES), "test": _split(TEST_ROWS, vocabulary_of(kind))})
    built = _build(raw, tmp_path)
    data = built.load()
    assert list(data["test"]["maker"]) == [maker(name) for _, name in TEST_ROWS]
    assert list(data["test"]["source_label"]) == [NAMES.index(name) for _, name in TEST_ROWS]  # train's ids
    assert built.dropped_total == 0


def test_an_id_outside_its_own_split_s_names_is_a_bad_label(tmp_path):
    own = sorted({name for _, name in TEST_ROWS})  # 16 names: ids 0..15
    test = _split(TEST_ROWS, own)
    table = test.data.table.set_column(1, "label", pa.array([*range(15), 20], pa.int64()))
    test = datasets.Dataset(datasets.table.InMemoryTable(table), info=test.info)  # id 20: a class in train's names
    built = _build(datasets.DatasetDict({"train": _split(TRAIN_ROWS, NAMES), "test": test}), tmp_path)
    assert built.dropped_bad_label == {"train": 0, "test": 1}
    assert built.dropped_rows == [
        {
            "split": "test",
            "index": 15,
            "reason": "bad label",
            "detail": "label 20 is outside the split's 16 class names",
        }
    ]
    assert json.loads((Path(built.path) / "dropped_rows.json").read_text()) == built.dropped_rows
