"""The stored raw copy is always the content its recorded revision names; damaged files fail clearly and
leave nothing behind (a full disk: test_source_disk_full.py).

| case                                                         | expected                                                   | test |
|--------------------------------------------------------------|------------------------------------------------------------|------|
| parquet rewritten in place (new images, same file names)     | new revision; the stored copy holds the new images         | test_changed_local_content_is_stored_not_the_cached_one |
| same, with size and mtime restored (only the bytes differ)   | same                                                       | (same, parametrized) |
| a second folder with the same name and file names            | its own revision and its own images                        | (same, parametrized) |
| `data/` a symlink                                            | accepted, same revision as a real folder with that content | test_symlinked_data_folder_is_read_and_followed |
| the symlink's target swapped                                 | new revision; the new target's images stored               | (same) |
| content reverted to the first version                        | the first revision again, its stored copy reused           | test_changed_local_content_is_stored_not_the_cached_one |
| folder changed between fingerprint and read                  | SourceError "changed while it was being read", no copy     | test_a_folder_changing_while_read_is_refused |
| symlink loop inside the source                               | followed once, no hang                                     | test_symlinked_data_folder_is_read_and_followed |
| through Dagster: `data/` symlink swapped between two runs    | manifest revision and stored images follow the target      | test_raw_asset_follows_a_swapped_symlink |
| parquet of 0 bytes / only "PAR1" / cut in half / middle cut out / a JPEG named .parquet | SourceError naming split, file, damage and fix; nothing stored | test_damaged_parquet_names_split_file_and_fix |
| labels: unknown class-name strings / fractional floats / NaN / booleans | SourceError naming split, file and the bad values  | test_bad_label_values_name_split_file_and_values |
| labels: known class-name strings / whole floats              | read as the class ids they name                            | test_class_name_strings_and_whole_floats_are_read_as_ids |
| a file of several staging batches and row groups, labels as names | every row stored in order with its own label         | test_a_file_larger_than_a_staging_batch_keeps_every_row_and_label |
| card pattern matching no file / a CSV among the data files / a file in two splits / an image stored as a path outside the folder / shards of a split with different columns | SourceError saying which and what to do; nothing stored | test_layouts_that_cannot_be_read_whole_are_refused_clearly |
| through Dagster: a damaged file                              | the step fails with SourceError naming split and file      | test_raw_asset_failure_names_the_damaged_file |
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from car_maker_pipeline.data.local_source import local_fingerprint, store_local_source
from car_maker_pipeline.data.source import RawDataset, materialize_raw
from car_maker_pipeline.data.source_schema import SourceError
from car_maker_pipeline_tests.support.sources import (
    AUDI,
    BMW,
    NAMES,
    image_bytes,
    make_source,
    photo,
    split_path,
    temporaries,
    write_parquet,
)

# ---------------------------------------------------------------------------------------------- stale content


def stored_test_images(folder: Path) -> list[bytes]:
    return [cell["bytes"] for cell in pq.read_table(split_path(folder, "test"))["image"].to_pylist()]


@pytest.mark.parametrize("label_type", [None, pa.string()], ids=["ids", "class-names"])
def test_a_file_larger_than_a_staging_batch_keeps_every_row_and_label(tmp_path, label_type):
    """Files are staged BATCH_ROWS rows at a time; labels are checked whole, then sliced per batch."""
    from car_maker_pipeline.data.staging import BATCH_ROWS

    folder = make_source(tmp_path / "stanford_cars", seed=3)
    rows = 2 * BATCH_ROWS + 7
    ids = [(AUDI, BMW, AUDI + 1)[i % 3] if i % 11 else None for i in range(rows)]
    images = [photo(5000 + i) for i in range(rows)]
    labels = ids if label_type is None else [None if i is None else NAMES[i] for i in ids]
    table = pa.table(
        {"image": pa.array([{"bytes": b, "path": None} for b in images]), "label": pa.array(labels, label_type)}
    )
    path = split_path(folder, "test")
    pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path, row_group_size=100)
    stored = materialize_raw(str(folder), tmp_path / "home").load()["test"]
    assert stored.num_rows == rows
    assert list(stored["label"]) == ids
    assert image_bytes(stored) == images


@pytest.mark.parametrize("change", ["rewritten", "same_size_and_mtime", "second_folder"])
def test_changed_local_content_is_stored_not_the_cached_one(tmp_path, change):
    home = tmp_path / "home"
    # BMP pictures in uncompressed parquet: another seed gives files of exactly the same size.
    fixed_size = {"fmt": "BMP", "compression": "none"}
    folder = make_source(tmp_path / "a" / "stanford_cars", seed=1, **fixed_size)
    first = materialize_raw(str(folder), home)
    assert image_bytes(first.load()["test"]) == stored_test_images(folder)

    second_folder = folder
    if change == "rewritten":
        make_source(folder, seed=2)
    elif change == "same_size_and_mtime":
        before = {path: path.stat() for path in folder.rglob("*.parquet")}
        make_source(folder, seed=2, **fixed_size)
        for path, stat in before.items():
            assert path.stat().st_size == stat.st_size
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only the bytes themselves differ
    else:
        second_folder = make_source(tmp_path / "b" / "stanford_cars", seed=2, **fixed_size)

    second = materialize_raw(str(second_folder), home)
    assert second.revision != first.revision and not second.cache_hit
    assert second.revision == local_fingerprint(second_folder)
    assert image_bytes(second.load()["test"]) == stored_test_images(second_folder)
    assert image_bytes(second.load()["test"]) != image_bytes(first.load()["test"])
    assert not (home / "hf_datasets_cache").exists()  # a local source is never served from datasets' cache

    if change == "rewritten":  # back to the first content: its revision, and its stored copy is reused
        make_source(folder, seed=1, **fixed_size)
        again = materialize_raw(str(folder), home)
        assert again.revision == first.revision and again.cache_hit
        assert image_bytes(again.load()["test"]) == stored_test_images(folder)


def test_symlinked_data_folder_is_read_and_followed(tmp_path):
    home = tmp_path / "home"
    real_a = make_source(tmp_path / "real_a", seed=1)
    real_b = make_source(tmp_path / "real_b", seed=2)
    folder = tmp_path / "stanford_cars"
    folder.mkdir()
    (folder / "data").symlink_to(real_a / "data", target_is_directory=True)
    (real_a / "data" / "loop").symlink_to(real_a, target_is_directory=True)  # must not hang the walk

    first = materialize_raw(str(folder), home)
    assert first.rows_per_split == {"train": 4, "test": 4}
    assert image_bytes(first.load()["test"]) == stored_test_images(real_a)

    (folder / "data").unlink()
    (folder / "data").symlink_to(real_b / "data", target_is_directory=True)
    second = materialize_raw(str(folder), home)
    assert second.revision != first.revision and not second.cache_hit
    assert image_bytes(second.load()["test"]) == stored_test_images(real_b)

    plain = tmp_path / "plain" / "stanford_cars"
    shutil.copytree(real_b / "data", plain / "data")
    assert local_fingerprint(plain) == second.revision  # the link is followed, not hashed as a link


def test_a_folder_changing_while_read_is_refused(tmp_path):
    folder = make_source(tmp_path / "stanford_cars", seed=1)
    before = local_fingerprint(folder)
    make_source(folder, seed=2)  # written between the fingerprint and the read
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError, match=rf"changed while it was being read \(fingerprint {before} before"):
        store_local_source(folder, str(folder), before, out)


@pytest.fixture
def two_folders(tmp_path):
    return make_source(tmp_path / "real_a", seed=1), make_source(tmp_path / "real_b", seed=2)


def _materialize_raw_asset(home: Path, folder: Path) -> dg.ExecuteInProcessResult:
    from car_maker_pipeline.orchestration.assets.data import raw_stanford_cars
    from car_maker_pipeline.orchestration.resources import StanfordCarsSource, StoreResource

    return dg.materialize(
        [raw_stanford_cars],
        resources={"store": StoreResource(home=str(home)), "source": StanfordCarsSource(path_or_id=str(folder))},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_raw_asset_follows_a_swapped_symlink(tmp_path, two_folders):
    from car_maker_pipeline.store import PipelineStore

    home, folder = tmp_path / "home", tmp_path / "stanford_cars"
    folder.mkdir()
    store = PipelineStore(home)
    for target in two_folders:
        (folder / "data").unlink(missing_ok=True)
        (folder / "data").symlink_to(target / "data", target_is_directory=True)
        assert _materialize_raw_asset(home, folder).success
        raw = RawDataset.current(store)
        assert raw.revision == local_fingerprint(target)
        assert image_bytes(raw.load()["test"]) == stored_test_images(target)


# ---------------------------------------------------------------------------------------------- damaged files


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    damaged = {
        "zero_bytes": b"",
        "magic_only": b"PAR1",
        "cut_in_half": data[: len(data) // 2],
        "middle_cut_out": data[:4] + data[len(data) // 2 :],  # header and footer kept, offsets wrong
        "not_parquet": photo(1, fmt="JPEG"),
    }[how]
    path.write_bytes(damaged)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("zero_bytes", r"is empty \(0 bytes\)"),
        ("magic_only", r"cut short or is not parquet: 4 bytes"),
        ("cut_in_half", r"cut short or is not parquet"),
        ("middle_cut_out", r"is damaged: parquet cannot read it"),
        ("not_parquet", r"cut short or is not parquet"),
    ],
)
def test_damaged_parquet_names_split_file_and_fix(tmp_path, how, says):
    folder = make_source(tmp_path / "stanford_cars", seed=1, rows=40)
    damaged = split_path(folder, "test")
    _damage(damaged, how)
    home = tmp_path / "home"
    with pytest.raises(SourceError) as error:
        materialize_raw(str(folder), home)
    message = str(error.value)
    assert f"Split 'test', file {damaged}" in message
    assert re.search(says, message), message
    assert "Replace it with a complete copy" in message
    assert not list((home / "raw_stanford_cars").rglob("_SOURCE_COMPLETE.json")) and not temporaries(home)


@pytest.mark.parametrize(
    ("labels", "label_type", "says"),
    [
        (
            ["Audi A5 Coupe 2012", "Trabant 601 1980", "Zastava Yugo 1987", None],
            pa.string(),
            r"2 label\(s\) naming no class.*'Trabant 601 1980', 'Zastava Yugo 1987'",
        ),
        (
            [float(AUDI), 3.5, float(BMW), 7.25],
            pa.float64(),
            r"2 label\(s\) that are not whole class ids \(row 1: 3\.5, row 3: 7\.25\)",
        ),
        (
            [float(AUDI), float("nan"), float(BMW), float(BMW)],
            pa.float64(),
            r"1 label\(s\) that are not whole class ids \(row 1: nan\)",
        ),
        ([True, False, True, False], pa.bool_(), r"label column of type bool"),
    ],
    ids=["unknown_names", "fractional", "nan", "booleans"],
)
def test_bad_label_values_name_split_file_and_values(tmp_path, labels, label_type, says):
    folder = make_source(tmp_path / "stanford_cars", seed=1)
    bad = write_parquet(split_path(folder, "test"), [photo(50 + i) for i in range(4)], labels, NAMES, label_type)
    home = tmp_path / "home"
    with pytest.raises(SourceError, match=says) as error:
        materialize_raw(str(folder), home)
    assert f"Split 'test', file {bad}" in str(error.value)
    assert not temporaries(home)


def test_class_name_strings_and_whole_floats_are_read_as_ids(tmp_path):
    folder = make_source(tmp_path / "stanford_cars", seed=1)
    write_parquet(
        split_path(folder, "test"),
        [photo(60 + i) for i in range(3)],
        ["BMW M3 Coupe 2012", None, "Audi A5 Coupe 2012"],
        NAMES,
        pa.string(),
    )
    write_parquet(
        split_path(folder, "train"),
        [photo(70 + i) for i in range(3)],
        [float(AUDI), float(BMW), None],
        NAMES,
        pa.float64(),
    )
    stored = materialize_raw(str(folder), tmp_path / "home").load()
    assert list(stored["test"]["label"]) == [BMW, None, AUDI]
    assert list(stored["train"]["label"]) == [AUDI, BMW, None]  # a missing label stays missing (dropped later, counted)


def test_raw_asset_failure_names_the_damaged_file(tmp_path):
    folder = make_source(tmp_path / "stanford_cars", seed=1)
    _damage(split_path(folder, "train"), "cut_in_half")
    result = _materialize_raw_asset(tmp_path / "home", folder)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    error = failure.step_failure_data.error
    assert error.cause.cls_name == "SourceError" and "DatasetGenerationError" not in error.to_string()
    assert f"Split 'train', file {split_path(folder, 'train')}" in error.cause.message


def _card_naming(folder: Path, patterns: dict[str, str]) -> None:
    data_files = "".join(f"    - split: {split}\n      path: {path}\n" for split, path in patterns.items())
    (folder / "README.md").write_text(f"---\nconfigs:\n  - config_name: default\n    data_files:\n{data_files}---\n")


@pytest.mark.parametrize(
    ("layout", "says"),
    [
        (
            "pattern_matches_nothing",
            r"No parquet file of source .* matches split 'test' \(patterns \['data/tset-\*'\]\)",
        ),
        (
            "csv_data_file",
            r"Split 'train' of source .* has data files that are not parquet: \['data/train-extra.csv'\]",
        ),
        (
            "file_in_two_splits",
            r"data/test-00000-of-00001.parquet in source .* matches both split 'test' and split 'all'",
        ),
        ("image_as_a_path_only", r"1 image\(s\) stored as a file path without their bytes"),
        ("shards_with_other_columns", r"The files of split 'train' of source .* disagree on their columns"),
    ],
)
def test_layouts_that_cannot_be_read_whole_are_refused_clearly(tmp_path, layout, says):
    folder = make_source(tmp_path / "stanford_cars", seed=1)
    if layout == "pattern_matches_nothing":
        _card_naming(folder, {"train": "data/train-*", "test": "data/tset-*"})
    elif layout == "csv_data_file":
        (folder / "data" / "train-extra.csv").write_text("image,label\n")
        _card_naming(folder, {"train": "data/train-*", "test": "data/test-*"})
    elif layout == "file_in_two_splits":
        _card_naming(folder, {"train": "data/train-*", "test": "data/test-*", "all": "data/*"})
    elif layout == "image_as_a_path_only":
        outside = tmp_path / "outside.png"
        outside.write_bytes(photo(5))
        table = pq.read_table(split_path(folder, "test"))
        cells = table["image"].to_pylist()
        cells[1] = {"bytes": None, "path": str(outside)}
        pq.write_table(
            table.set_column(0, "image", pa.array(cells, table.schema.field("image").type)), split_path(folder, "test")
        )
    else:
        write_parquet(split_path(folder, "train", 0, 2), [photo(7)], [AUDI], NAMES)
        table = pq.read_table(split_path(folder, "train")).append_column("extra", pa.array(["x"] * 4))
        pq.write_table(table, split_path(folder, "train", 1, 2))
        split_path(folder, "train").unlink()
    home = tmp_path / "home"
    with pytest.raises(SourceError, match=says):
        materialize_raw(str(folder), home)
    assert not temporaries(home) and not list(home.rglob("_SOURCE_COMPLETE.json"))
