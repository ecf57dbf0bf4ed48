import io

import datasets
import numpy as np
import pytest
from PIL import Image, ImageFile

from car_maker_pipeline.data import quality
from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.maker_dataset import (
    MakerDatasetError,
    MakerDatasetParams,
    build_maker_dataset,
    decode_once,
    load_stored_maker_dataset,
)
from car_maker_pipeline.data.makers import UnknownClassNameError

NAMES = list(stanford_cars_class_names())
ASTON = NAMES.index("Aston Martin V8 Vantage Coupe 2012")
LAND_ROVER = NAMES.index("Land Rover LR2 SUV 2012")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid(color, size=(24, 16), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(sum(color) + size[0])
    pixels = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(
        np.uint8
    )
    return Image.fromarray(pixels, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(pixels, "RGB")


def raw_from_rows(splits: dict[str, list[tuple[bytes, int]]], names=NAMES) -> datasets.DatasetDict:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [label for _, label in rows]},
                features=features,
            )
            for split, rows in splits.items()
        }
    )


def small_raw(extra_train=(), extra_test=()) -> datasets.DatasetDict:
    train = [(encode(solid((200, 30 + i, 30)), "JPEG"), ASTON) for i in range(6)]
    train += [(encode(solid((30, 200, 30 + i)), "PNG"), LAND_ROVER) for i in range(6)]
    test = [(encode(solid((210, 40 + i, 40)), "JPEG"), ASTON) for i in range(2)] + [
        (encode(solid((40, 210, 60 + i)), "PNG"), LAND_ROVER) for i in range(2)
    ]
    return raw_from_rows({"train": train + list(extra_train), "test": test + list(extra_test)})


def test_demo_source_becomes_a_maker_dataset(maker_dataset, raw_dataset):
    assert maker_dataset.makers == sorted(maker_dataset.makers)
    assert {"AM General", "Aston Martin", "Land Rover", "Mercedes-Benz", "Rolls-Royce", "BMW"} == set(
        maker_dataset.makers
    )
    data = maker_dataset.load()
    assert list(data) == ["train", "validation", "test", "contrast"]
    assert {"image", "maker", "maker_id", "source_class", "model", "year", "content_hash"} <= set(
        data["train"].column_names
    )
    assert data["train"].features["maker_id"].names == maker_dataset.makers
    # The validation split is carved from train, stratified: every maker is in it.
    assert set(data["validation"]["maker"]) == set(maker_dataset.makers)
    assert data["train"].num_rows + data["validation"].num_rows == raw_dataset.rows_per_split["train"]
    # Test and the corrupted copy are untouched: same rows, same order.
    raw = raw_dataset.load()
    assert data["test"]["source_label"] == list(raw["test"]["label"])
    assert data["contrast"]["source_label"] == list(raw["contrast"]["label"])
    # Every kept image decodes as RGB, whatever it was stored as (the demo source mixes L, CMYK, RGBA).
    assert {image.mode for image in data["train"]["image"]} == {"RGB"}
    row = data["train"][0]
    assert row["maker"] == data["train"].features["maker_id"].names[row["maker_id"]]
    assert row["source_class"].startswith(row["maker"]) and row["year"] > 1990


def test_quality_checks_pass_on_a_clean_build(maker_dataset):
    data = maker_dataset.load()
    for check in (
        quality.check_no_test_leakage,
        quality.check_test_makers_seen_in_train,
        quality.check_no_empty_split,
        quality.check_maker_list_matches_data,
    ):
        passed, details = check(data)
        assert passed, (check.__name__, details)


def test_leakage_check_finds_a_test_image_that_is_also_in_train(tmp_path):
    shared = encode(solid((10, 10, 250)), "PNG")
    built = build_maker_dataset(
        small_raw(extra_train=[(shared, ASTON)] * 2, extra_test=[(shared, ASTON)]), tmp_path / "out"
    )
    passed, details = quality.check_no_test_leakage(built.load())
    assert not passed and details["shared_images"] == 1


def test_corrupt_and_truncated_images_are_counted_and_skipped(tmp_path):
    good_jpeg = encode(solid((200, 30, 30)), "JPEG")
    broken = [(b"not an image at all", ASTON), (good_jpeg[: len(good_jpeg) // 2], ASTON), (b"", LAND_ROVER)]
    built = build_maker_dataset(small_raw(extra_train=broken, extra_test=broken[:1]), tmp_path / "out")
    assert built.dropped_undecodable == {"train": 3, "test": 1}
    assert built.dropped_total == 4
    assert built.rows_per_split["train"] + built.rows_per_split["validation"] == 12
    assert built.rows_per_split["test"] == 4


def test_unknown_class_name_stops_the_build_and_names_it(tmp_path):
    names = NAMES[:-1] + ["Trabant 601 Limousine 1985"]
    raw = raw_from_rows(
        {"train": [(encode(solid((1, 2, 3)), "PNG"), 0)] * 2, "test": [(encode(solid((3, 2, 1)), "PNG"), 0)]},
        names=names,
    )
    with pytest.raises(UnknownClassNameError, match="Trabant 601 Limousine 1985"):
        build_maker_dataset(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_split_and_empty_split_are_clear_errors(tmp_path):
    raw = small_raw()
    with pytest.raises(MakerDatasetError, match="no 'test' split"):
        build_maker_dataset(datasets.DatasetDict({"train": raw["train"]}), tmp_path / "a")
    empty = datasets.DatasetDict({"train": raw["train"], "test": raw["test"].select([])})
    with pytest.raises(MakerDatasetError, match="'test' is empty"):
        build_maker_dataset(empty, tmp_path / "b")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_every_image_mode_is_converted_to_rgb_once(mode):
    base = solid((180, 60, 20), size=(20, 12))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "RGBA":
        image = base.convert("RGBA")
        image.putalpha(128)
    else:
        image = base.convert(mode)
    data = encode(image, "TIFF" if mode == "I;16" else ("JPEG" if mode == "CMYK" else "PNG"))
    encoded, pixel_hash = decode_once(data)
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.mode == "RGB" and decoded.size == (20, 12)
    assert len(pixel_hash) == 32


def test_rgb_jpeg_bytes_are_kept_as_they_are():
    data = encode(solid((90, 90, 90)), "JPEG")
    assert decode_once(data)[0] is data


def test_exif_rotation_is_applied():
    image = solid((10, 200, 10), size=(30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    encoded, _ = decode_once(encode(image, "JPEG", exif=exif))
    assert Image.open(io.BytesIO(encoded)).size == (10, 30)


def test_each_image_is_decoded_exactly_once(tmp_path, monkeypatch):
    raw = small_raw()
    calls = []
    original = ImageFile.ImageFile.load

    def counting_load(self):
        if self._im is None:  # a real decode; later load() calls on a decoded image are no-ops
            calls.append(1)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    build_maker_dataset(raw, tmp_path / "out", MakerDatasetParams(num_proc=1))
    assert len(calls) == raw["train"].num_rows + raw["test"].num_rows


def test_a_complete_build_is_found_again_and_a_half_written_one_is_not(tmp_path):
    built = build_maker_dataset(small_raw(), tmp_path / "out")
    again = load_stored_maker_dataset(tmp_path / "out")
    assert again is not None and again.cache_hit and again.makers == built.makers
    (tmp_path / "half").mkdir()
    assert load_stored_maker_dataset(tmp_path / "half") is None


def test_maker_with_a_single_training_image_cannot_be_stratified(tmp_path):
    raw = raw_from_rows(
        {
            "train": [(encode(solid((200, 30 + i, 30)), "JPEG"), ASTON) for i in range(4)]
            + [(encode(solid((20, 200, 30)), "PNG"), LAND_ROVER)],
            "test": [(encode(solid((20, 30, 200)), "PNG"), ASTON)],
        }
    )
    with pytest.raises(MakerDatasetError, match="Land Rover"):
        build_maker_dataset(raw, tmp_path / "out")
