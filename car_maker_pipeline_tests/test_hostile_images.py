"""Images that cost too much to prepare are dropped by their dimensions; every dropped row is listed.

The bound (`model_inputs.images`): the picture the model is given, after padding to at most 8:1,
may have at most MAX_IMAGE_PIXELS (64 Mpx). Pixel count alone let an 8,000,000 x 8 strip through
(64 Mpx), whose 8:1 canvas is 8 Tpx.

| image (width x height)            | data step                                  | model_ready                          |
|-----------------------------------|--------------------------------------------|--------------------------------------|
| 8,000,000 x 8 (a few KB as PNG)   | dropped, "too large", never decoded        | scaled down; canvas <= 64 Mpx, <= 8:1 |
| 8 x 8,000,000                     | same                                       | same                                 |
| 60,000 x 60                       | dropped (its canvas would be 450 Mpx)      | same                                 |
| 20,000 x 20                       | kept (canvas 50 Mpx, under the bound)      | padded to 20,000 x 2,500, not scaled |
| 5,000 x 10 (500:1)                | kept                                       | padded to 5,000 x 625 (as before)    |
| 9,000 x 9,000 (81 Mpx bomb)       | dropped, "too large"                       | -                                    |

Dropped-rows table (split, index in the raw split, reason, detail), stored with the dataset and in
the asset metadata: undecodable bytes, a truncated JPEG, empty bytes, a missing image, a label
outside the class list, a missing label, an elongated strip, a bomb, a duplicate (naming the row it
repeats); more than DROPPED_ROWS_SHOWN dropped rows keep the first ones in the record and all in the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import dagster as dg
import datasets
import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from car_maker_pipeline.data.decoding import TOO_LARGE, decode_checked
from car_maker_pipeline.data.maker_dataset import DROPPED_ROWS_SHOWN, MakerDatasetParams, build_maker_dataset
from car_maker_pipeline.model_inputs.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, model_ready
from car_maker_pipeline_tests.support.sources import NAMES, photo, split_path, write_parquet

BMW = NAMES.index("BMW M3 Coupe 2012")
AUDI = NAMES.index("Audi A5 Coupe 2012")


def png(size: tuple[int, int], mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_with(train_extra: list[tuple[bytes | None, int | None]]) -> datasets.DatasetDict:
    """Three ordinary pictures per maker in train (indices 0-5), then the extra rows; a clean test split."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    base = [(photo(i), BMW if i < 3 else AUDI) for i in range(6)]

    def split(rows):
        table = pa.table(
            {
                "image": pa.array([None if b is None else {"bytes": b, "path": None} for b, _ in rows]),
                "label": pa.array([label for _, label in rows], pa.int64()),
            }
        )
        # Straight from Arrow: the ClassLabel's own range check would refuse the out-of-range label.
        return datasets.Dataset(
            datasets.table.InMemoryTable(table.cast(features.arrow_schema)),
            info=datasets.DatasetInfo(features=features),
        )

    return datasets.DatasetDict(
        {"train": split(base + train_extra), "test": split([(photo(90), BMW), (photo(91), AUDI)])}
    )


def build(tmp_path, raw):
    return build_maker_dataset(raw, tmp_path / "built", MakerDatasetParams(validation_fraction=0.25, num_proc=1))


@pytest.mark.parametrize(
    ("size", "kept"),
    [
        ((8_000_000, 8), False),
        ((8, 8_000_000), False),
        ((60_000, 60), False),
        ((20_000, 20), True),
        ((5_000, 10), True),
    ],
)
def test_elongated_images_are_bounded_by_their_padded_canvas(tmp_path, monkeypatch, size, kept):
    decoded_sizes = []
    original = ImageFile.ImageFile.load

    def recording_load(self):
        if self._im is None:
            decoded_sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    record = build(tmp_path, raw_with([(png(size), BMW)]))
    assert record.dropped_undecodable["train"] == (0 if kept else 1)
    assert record.rows_per_split["train"] + record.rows_per_split["validation"] == (7 if kept else 6)
    assert (size in decoded_sizes) == kept  # a refused strip is never decoded: its header says enough
    if not kept:
        (row,) = record.dropped_rows
        assert row["split"] == "train" and row["index"] == 6 and row["reason"] == TOO_LARGE
        assert f"{size[0]}x{size[1]} is elongated" in row["detail"] and "64,000,000-pixel limit" in row["detail"]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((2_000_000, 4), None),  # scaled down: compared against the bound below
        ((4, 2_000_000), None),
        ((60_000, 60), None),
        ((20_000, 20), (20_000, 2_500)),
        ((5_000, 10), (5_000, 625)),
        ((64, 48), (64, 48)),
    ],
)
def test_model_ready_never_allocates_more_than_the_bound(size, expected):
    image = Image.new("L", size, 30)
    ready = model_ready(image)
    width, height = ready.size
    assert ready.mode == "RGB"
    assert width * height <= MAX_IMAGE_PIXELS and max(width, height) <= MAX_ASPECT_RATIO * min(width, height)
    if expected is not None:
        assert ready.size == expected
    else:  # kept its orientation, and its long side shrank only as far as needed
        assert (width > height) == (size[0] > size[1]) and max(width, height) > 20_000


def test_the_bomb_and_the_strip_say_why_they_were_refused():
    bomb = decode_checked(png((9_000, 9_000)))
    assert bomb.reason == TOO_LARGE and "9000x9000 is 81,000,000 pixels" in bomb.detail
    strip = decode_checked(png((8_000_000, 8)))
    assert strip.reason == TOO_LARGE and "8000000x1000000 = 8,000,000,000,000 pixels" in strip.detail


def test_every_dropped_row_is_listed_with_its_reason(tmp_path):
    truncated = photo(40, size=(200, 150), fmt="JPEG")[:300]
    duplicate_of_row_2 = photo(2)
    extra = [
        (b"not an image at all", BMW),  # 6
        (truncated, BMW),  # 7
        (b"", AUDI),  # 8
        (None, AUDI),  # 9
        (photo(41), 196),  # 10: outside the 196 class names
        (photo(42), None),  # 11
        (png((8_000_000, 8)), BMW),  # 12
        (png((9_000, 9_000)), BMW),  # 13
        (duplicate_of_row_2, BMW),  # 14
        (photo(43), BMW),  # 15: kept
    ]
    record = build(tmp_path, raw_with(extra))
    rows = {row["index"]: (row["reason"], row["detail"]) for row in record.dropped_rows}
    assert sorted(rows) == list(range(6, 15)) and {row["split"] for row in record.dropped_rows} == {"train"}
    assert rows[6][0] == rows[7][0] == rows[8][0] == rows[9][0] == "undecodable"
    assert "not an image format" in rows[6][1] and "no image bytes" in rows[8][1] and "no image bytes" in rows[9][1]
    assert rows[10] == ("bad label", "label 196 is outside the split's 196 class names")
    assert rows[11] == ("bad label", "no label")
    assert rows[12][0] == rows[13][0] == "too large"
    assert rows[14] == ("duplicate", "same pixels as row 2")
    assert record.dropped_undecodable == {"train": 6, "test": 0}  # unreadable or too large to prepare
    assert record.dropped_bad_label == {"train": 2, "test": 0} and record.dropped_duplicate == {"train": 1, "test": 0}
    assert json.loads((Path(record.path) / "dropped_rows.json").read_text()) == record.dropped_rows
    assert record.dropped_rows_heading().startswith("9 row(s) dropped (all in")
    table = record.dropped_rows_table()
    assert list(table.columns) == ["split", "index", "reason", "detail"] and len(table) == 9
    assert table.iloc[-1].to_dict() == {
        "split": "train",
        "index": 14,
        "reason": "duplicate",
        "detail": "same pixels as row 2",
    }


def test_many_dropped_rows_keep_the_first_in_the_record_and_all_in_the_file(tmp_path):
    junk = [(f"junk {i}".encode(), BMW) for i in range(DROPPED_ROWS_SHOWN + 25)]
    record = build(tmp_path, raw_with(junk))
    assert len(record.dropped_rows) == DROPPED_ROWS_SHOWN and record.dropped_total == DROPPED_ROWS_SHOWN + 25
    assert [row["index"] for row in record.all_dropped_rows()] == list(range(6, 6 + DROPPED_ROWS_SHOWN + 25))
    assert record.dropped_rows_heading().startswith(f"{DROPPED_ROWS_SHOWN + 25} row(s) dropped; the first 200 shown")
    assert len(record.dropped_rows_table()) == DROPPED_ROWS_SHOWN


def test_the_asset_metadata_shows_the_dropped_rows(tmp_path):
    from car_maker_pipeline.orchestration.assets.data import car_maker_dataset, raw_stanford_cars
    from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource

    folder = tmp_path / "stanford_cars"
    images = [photo(i) for i in range(8)] + [png((8, 8_000_000)), b"\x89PNG broken"]
    write_parquet(split_path(folder, "train"), images, [BMW, AUDI] * 4 + [BMW, AUDI], NAMES)
    write_parquet(split_path(folder, "test"), [photo(50), photo(51)], [BMW, AUDI], NAMES)
    result = dg.materialize(
        [raw_stanford_cars, car_maker_dataset],
        resources={
            "store": StoreResource(home=str(tmp_path / "home")),
            "source": StanfordCarsSource(path_or_id=str(folder)),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    metadata = result.asset_materializations_for_node("car_maker_dataset")[0].metadata
    rows = [record.data for record in metadata["dropped_rows"].value.records]
    assert metadata["dropped_count"].value == 2 and metadata["dropped_rows_note"].value.startswith("2 row(s) dropped")
    assert [column.type for column in metadata["dropped_rows"].value.schema.columns] == [
        "string",
        "int",
        "string",
        "string",
    ]
    assert rows[0]["index"] == 8 and rows[0]["reason"] == "too large" and "8x8000000 is elongated" in rows[0]["detail"]
    assert rows[1]["index"] == 9 and rows[1]["reason"] == "undecodable"
    assert metadata["dropped_undecodable"].value == {"train": 2, "test": 0}
