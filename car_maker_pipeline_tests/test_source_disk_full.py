"""A full disk while the raw source or the maker dataset is written: a clear error, no temporary left, and
a rerun that stores the whole copy.

| case                                                         | expected                                                   | test |
|--------------------------------------------------------------|------------------------------------------------------------|------|
| disk full while saving a split / writing the completion mark | OSError ENOSPC naming the folder; no temporary left; rerun stores whole | test_disk_full_leaves_no_temporary_and_the_rerun_succeeds |
| disk full and the cleanup fails too                          | the next successful run in the same process removes it     | test_a_temporary_that_could_not_be_removed_goes_with_the_next_run |
| a dead writer's temporary, then a rerun that reuses the store | removed                                                   | (same) |
| building car_maker_dataset from the stored raw copy           | raw folder's files and sizes unchanged; no temporary left | test_building_the_maker_dataset_writes_nothing_into_the_raw_store |
| disk full while building car_maker_dataset                   | no temporary or work file left                             | (same) |
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from car_maker_pipeline.data.source import materialize_raw
from car_maker_pipeline_tests.support.sources import make_source, temporaries


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_on_second_call(original):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first split is on disk, the disk fills during the second
            _enospc()
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("where", ["saving_a_split", "completion_marker"])
def test_disk_full_leaves_no_temporary_and_the_rerun_succeeds(tmp_path, monkeypatch, where):
    folder = make_source(tmp_path / "stanford_cars", seed=1)
    home = tmp_path / "home"
    with monkeypatch.context() as patch:
        if where == "saving_a_split":
            patch.setattr(datasets.Dataset, "save_to_disk", _fail_on_second_call(datasets.Dataset.save_to_disk))
        else:
            import car_maker_pipeline.data.source as source

            patch.setattr(source, "write_json_atomic", _enospc)
        with pytest.raises(OSError) as error:
            materialize_raw(str(folder), home)
    assert error.value.errno == errno.ENOSPC
    assert "No space left on device while writing" in str(error.value) and "CAR_MAKER_HOME" in str(error.value)
    assert not temporaries(home)
    assert not list(home.rglob("_SOURCE_COMPLETE.json"))

    stored = materialize_raw(str(folder), home)
    assert not stored.cache_hit and stored.rows_per_split == {"train": 4, "test": 4}
    assert not temporaries(home)


def test_a_temporary_that_could_not_be_removed_goes_with_the_next_run(tmp_path, monkeypatch):
    import car_maker_pipeline.storage as storage

    folder = make_source(tmp_path / "stanford_cars", seed=1)
    home = tmp_path / "home"
    with monkeypatch.context() as patch:  # a disk so full that even deleting fails
        patch.setattr(datasets.Dataset, "save_to_disk", _fail_on_second_call(datasets.Dataset.save_to_disk))
        patch.setattr(storage.shutil, "rmtree", lambda *args, **kwargs: None)
        with pytest.raises(OSError):
            materialize_raw(str(folder), home)
    assert len(temporaries(home)) >= 1  # our own pid, still alive: only knowing it was abandoned can clear it

    stored = materialize_raw(str(folder), home)  # same process, disk freed
    assert not stored.cache_hit and not temporaries(home)

    # A writer killed on this host (its pid is gone), then a run that only reuses the stored copy.
    dead_pid = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    leftover = Path(stored.path).parent / f".{Path(stored.path).name}.tmp-{dead_pid}@{socket.gethostname()}@x"
    (leftover / "train").mkdir(parents=True)
    assert materialize_raw(str(folder), home).cache_hit
    assert not leftover.exists() and not temporaries(home)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_building_the_maker_dataset_writes_nothing_into_the_raw_store(tmp_path, demo_source, monkeypatch):
    from car_maker_pipeline.data.maker_dataset import build_maker_dataset

    home = tmp_path / "home"
    raw = materialize_raw(str(demo_source), home)
    before = _files(Path(raw.path))
    built = build_maker_dataset(raw.load(), home / "car_maker_dataset" / "built", source_revision=raw.revision)
    assert _files(Path(raw.path)) == before
    assert not temporaries(home)
    assert sorted(p.name for p in Path(built.path).iterdir()) == [
        "_DATASET_COMPLETE.json",
        "contrast",
        "dataset_dict.json",
        "dropped_rows.json",
        "test",
        "train",
        "validation",
    ]

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "save_to_disk", _fail_on_second_call(datasets.Dataset.save_to_disk))
        with pytest.raises(OSError, match="No space left on device while writing"):
            build_maker_dataset(raw.load(), home / "car_maker_dataset" / "other", source_revision=raw.revision)
    assert _files(Path(raw.path)) == before
    assert not temporaries(home) and not (home / "car_maker_dataset" / "other").exists()
