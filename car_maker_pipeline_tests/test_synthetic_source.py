"""The offline demo source must load exactly like `tanganke/stanford_cars` and be reproducible."""

from __future__ import annotations

import collections
import hashlib
import io
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.makers import maker_of
from car_maker_pipeline.offline.corruptions import ALL_CORRUPTIONS
from car_maker_pipeline.offline.demo_source import DEMO_MAKERS, MARKER_FILE, generate_demo_source
from car_maker_pipeline.offline.rendering import render_car

TRAIN_PER_MAKER, TEST_PER_MAKER = 6, 4
SIZE = (64, 48)  # small images keep the tests fast; the layout is what is under test


def _load(path: Path, cache: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(str(path), cache_dir=str(cache))


def _raw_image_bytes(path: Path, split: str) -> list[bytes]:
    """The stored bytes of each row, read straight from the parquet file (no decoding)."""
    table = pq.read_table(path / "data" / f"{split}-00000-of-00001.parquet")
    return [cell["bytes"] for cell in table.column("image").to_pylist()]


def _file_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "stanford_cars_demo"
    returned = generate_demo_source(
        out,
        train_per_maker=TRAIN_PER_MAKER,
        test_per_maker=TEST_PER_MAKER,
        corruptions=ALL_CORRUPTIONS,
        image_size=SIZE,
        seed=0,
    )
    assert returned == out
    return out


@pytest.fixture(scope="module")
def loaded(source, tmp_path_factory) -> datasets.DatasetDict:
    return _load(source, tmp_path_factory.mktemp("hf_cache"))


def test_layout_is_the_hub_layout(source):
    assert sorted(p.name for p in (source / "data").iterdir()) == sorted(
        f"{split}-00000-of-00001.parquet" for split in ("train", "test", *ALL_CORRUPTIONS)
    )
    card = (source / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert [f["name"] for f in meta["dataset_info"]["features"]] == ["image", "label"]
    names = meta["dataset_info"]["features"][1]["dtype"]["class_label"]["names"]
    assert [names[str(i)] for i in range(196)] == list(stanford_cars_class_names())
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {
        "train": 6 * TRAIN_PER_MAKER,
        "test": 6 * TEST_PER_MAKER,
        **{c: 6 * TEST_PER_MAKER for c in ALL_CORRUPTIONS},
    }
    assert meta["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    # Nothing half-written or temporary is left next to the source.
    assert [p.name for p in source.parent.iterdir()] == [source.name]


def test_load_dataset_yields_every_split_with_the_real_features(loaded):
    expected = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(stanford_cars_class_names()))}
    )
    assert set(loaded) == {"train", "test", *ALL_CORRUPTIONS}
    for split, part in loaded.items():
        assert part.features == expected, split
        assert part.features["label"].num_classes == 196
        assert part.features["label"].names[8] == "Aston Martin V8 Vantage Coupe 2012"
    assert loaded["train"].num_rows == len(DEMO_MAKERS) * TRAIN_PER_MAKER
    assert loaded["test"].num_rows == len(DEMO_MAKERS) * TEST_PER_MAKER


def test_parquet_metadata_alone_keeps_the_class_names(source, tmp_path):
    """Without the README, load_dataset still recovers the ClassLabel from the parquet schema metadata."""
    bare = tmp_path / "bare"
    shutil.copytree(source / "data", bare / "data")
    part = _load(bare, tmp_path / "cache")
    assert set(part) == {"train", "test", *ALL_CORRUPTIONS}
    assert part["train"].features["label"] == datasets.ClassLabel(names=list(stanford_cars_class_names()))
    assert isinstance(part["train"].features["image"], datasets.Image)


def test_labels_are_real_class_ids_of_the_chosen_makers_only(loaded):
    names = stanford_cars_class_names()
    for split in ("train", "test"):
        per_maker = collections.Counter(maker_of(names[label]) for label in loaded[split]["label"])
        per = TRAIN_PER_MAKER if split == "train" else TEST_PER_MAKER
        assert per_maker == {maker: per for maker in DEMO_MAKERS}
    aston = {label for label in loaded["train"]["label"] if maker_of(names[label]) == "Aston Martin"}
    assert aston <= {7, 8, 9, 10} and len(aston) > 1  # several real Aston Martin classes, not one per maker
    assert {label for label in loaded["train"]["label"] if maker_of(names[label]) == "AM General"} == {0}


def test_custom_makers(tmp_path):
    out = generate_demo_source(
        tmp_path / "src", makers=("Audi", "Tesla"), train_per_maker=3, test_per_maker=2, corruptions=(), image_size=SIZE
    )
    part = _load(out, tmp_path / "cache")
    assert set(part) == {"train", "test"}
    names = stanford_cars_class_names()
    assert collections.Counter(maker_of(names[label]) for label in part["train"]["label"]) == {"Audi": 3, "Tesla": 3}


def test_images_are_encoded_bytes_that_decode_to_the_requested_size(source, loaded):
    table = pq.read_table(source / "data" / "train-00000-of-00001.parquet")
    cell = table.column("image")[0].as_py()
    assert set(cell) == {"bytes", "path"} and cell["path"] is None and isinstance(cell["bytes"], bytes)
    image = loaded["train"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == SIZE


def test_format_mix_like_the_real_data(tmp_path):
    out = generate_demo_source(
        tmp_path / "src", train_per_maker=60, test_per_maker=1, corruptions=(), image_size=SIZE, seed=0
    )
    kinds = collections.Counter()
    for data in _raw_image_bytes(out, "train"):
        with Image.open(io.BytesIO(data)) as image:
            kinds[(image.format, image.mode)] += 1
    total = sum(kinds.values())
    assert 0.7 < kinds[("JPEG", "RGB")] / total < 0.9, kinds
    assert kinds[("PNG", "RGB")] >= 0.05 * total, kinds
    rare = {key: kinds[key] for key in (("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"))}
    assert all(count > 0 for count in rare.values()), kinds
    assert sum(rare.values()) < 0.15 * total, kinds
    assert set(kinds) == {("JPEG", "RGB"), ("PNG", "RGB"), *rare}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(source, tmp_path):
    again = generate_demo_source(
        tmp_path / "again",
        train_per_maker=TRAIN_PER_MAKER,
        test_per_maker=TEST_PER_MAKER,
        corruptions=ALL_CORRUPTIONS,
        image_size=SIZE,
        seed=0,
    )
    assert _file_hashes(again) == _file_hashes(source)
    other = generate_demo_source(
        tmp_path / "other",
        train_per_maker=TRAIN_PER_MAKER,
        test_per_maker=TEST_PER_MAKER,
        corruptions=ALL_CORRUPTIONS,
        image_size=SIZE,
        seed=1,
    )
    other_hashes, hashes = _file_hashes(other), _file_hashes(source)
    for name in hashes:
        if name.endswith(".parquet"):
            assert other_hashes[name] != hashes[name], name
    assert not set(_raw_image_bytes(other, "train")) & set(_raw_image_bytes(source, "train"))


def test_no_image_bytes_shared_between_or_within_splits(source):
    seen: dict[str, str] = {}
    for split in ("train", "test", *ALL_CORRUPTIONS):
        for data in _raw_image_bytes(source, split):
            digest = hashlib.sha256(data).hexdigest()
            assert digest not in seen, f"{split} repeats an image of {seen.get(digest)}"
            seen[digest] = split


def test_corrupted_splits_are_the_test_rows_in_order_with_changed_pixels(loaded):
    test = loaded["test"]
    for corruption in ALL_CORRUPTIONS:
        part = loaded[corruption]
        assert part["label"] == test["label"], corruption
        diffs = []
        for original, corrupted in zip(test["image"], part["image"]):
            assert corrupted.size == original.size
            assert corrupted.mode == original.mode  # re-encoded in the original's format and mode
            a = np.asarray(original.convert("RGB"), dtype=np.float32)
            b = np.asarray(corrupted.convert("RGB"), dtype=np.float32)
            diffs.append(np.abs(a - b).mean())
        assert min(diffs) > 1.0, (corruption, min(diffs))


def test_corrupted_images_still_resemble_the_test_image(loaded):
    """Moderate severity: each corrupted image correlates best with its own test image, not another row's."""

    def pixels(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB"), dtype=np.float64).ravel()

    test = [pixels(im) for im in loaded["test"]["image"]]
    for corruption in ALL_CORRUPTIONS:
        corrupted = [pixels(im) for im in loaded[corruption]["image"]]
        own = np.array([np.corrcoef(c, t)[0, 1] for c, t in zip(corrupted, test)])
        shifted = np.array([np.corrcoef(c, t)[0, 1] for c, t in zip(corrupted, test[1:] + test[:1])])
        assert np.mean(own > shifted) >= 0.9, (corruption, own.round(2), shifted.round(2))
        assert np.median(own) > 0.5, (corruption, own.round(2))


def test_unknown_maker_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as error:
        generate_demo_source(tmp_path / "x", makers=("BMW", "Trabant"), train_per_maker=1, test_per_maker=1)
    message = str(error.value)
    assert "Trabant" in message and "Aston Martin" in message and "Volvo" in message
    assert not (tmp_path / "x").exists()


def test_unknown_corruption_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as error:
        generate_demo_source(tmp_path / "x", corruptions=("fog",), train_per_maker=1, test_per_maker=1)
    message = str(error.value)
    assert "fog" in message and all(name in message for name in ALL_CORRUPTIONS)
    assert not (tmp_path / "x").exists()


def test_regenerating_replaces_its_own_folder_but_never_a_foreign_one(tmp_path):
    out = tmp_path / "src"
    generate_demo_source(out, train_per_maker=1, test_per_maker=1, corruptions=(), image_size=SIZE, seed=0)
    first = _file_hashes(out)
    assert (out / MARKER_FILE).exists()
    generate_demo_source(out, train_per_maker=2, test_per_maker=1, corruptions=("pixelate",), image_size=SIZE, seed=3)
    assert _file_hashes(out) != first
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "pixelate-00000-of-00001.parquet",
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary or old copies left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        generate_demo_source(foreign, train_per_maker=1, test_per_maker=1, corruptions=(), image_size=SIZE)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_render_car_is_deterministic_and_checks_the_class():
    a = render_car("BMW", "BMW M3 Coupe 2012", np.random.default_rng(7), (128, 96))
    b = render_car("BMW", "BMW M3 Coupe 2012", np.random.default_rng(7), (128, 96))
    c = render_car("BMW", "BMW M3 Coupe 2012", np.random.default_rng(8), (128, 96))
    assert a.mode == "RGB" and a.size == (128, 96)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    with pytest.raises(ValueError, match="not a Stanford Cars class made by 'Audi'"):
        render_car("Audi", "BMW M3 Coupe 2012", np.random.default_rng(0), (128, 96))


def test_maker_cue_is_stronger_than_the_nuisance():
    """Same maker, different nuisance draws, are closer (on the car region) than two makers are.

    A crude check that the generator encodes the maker: the average image of each maker, over many
    random backgrounds and placements, differs clearly between makers.
    """
    names = stanford_cars_class_names()
    means = {}
    for maker in DEMO_MAKERS:
        classes = [name for name in names if maker_of(name) == maker]
        stack = [
            np.asarray(
                render_car(maker, classes[i % len(classes)], np.random.default_rng([1, i]), (64, 48)), dtype=np.float32
            )
            for i in range(40)
        ]
        means[maker] = np.mean(stack, axis=0)
    for i, m1 in enumerate(DEMO_MAKERS):
        for m2 in DEMO_MAKERS[i + 1 :]:
            assert np.abs(means[m1] - means[m2]).mean() > 4.0, (m1, m2)


def test_a_split_file_is_written_row_group_by_row_group_not_held_until_closed(tmp_path):
    """What keeps generation's memory flat at the real dataset's size: rows reach the disk as each
    row group fills, and the file reads back as the rows went in, with the features' metadata."""
    from car_maker_pipeline.offline.split_files import SplitFile, read_split_file

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = [(np.random.default_rng(i).bytes(2000), i % 2) for i in range(250)]
    path = tmp_path / "train-00000-of-00001.parquet"
    with SplitFile(path, features) as writer:
        for data, label in rows:
            writer.add(data, label)
        assert path.stat().st_size > 200 * 2000  # two full row groups already on disk, before closing
    assert writer.counts[0] == 250
    assert list(read_split_file(path)) == rows
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert datasets.Features.from_arrow_schema(pq.read_schema(path)) == features
