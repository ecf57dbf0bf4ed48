import io
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.local_source import local_fingerprint
from car_maker_pipeline.data.source import materialize_raw, resolve_revision
from car_maker_pipeline.data.source_schema import SourceError


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_source(folder: Path, splits: dict[str, dict], features: datasets.Features | None) -> Path:
    """A Stanford-Cars-shaped parquet folder with hand-made rows."""
    (folder / "data").mkdir(parents=True)
    for split, columns in splits.items():
        datasets.Dataset.from_dict(columns, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet")
        )
    return folder


def stanford_features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(stanford_cars_class_names()))}
    )


def test_materialize_stores_every_split_and_reuses_the_cache(demo_source, tmp_path):
    first = materialize_raw(str(demo_source), tmp_path)
    assert not first.cache_hit
    assert set(first.rows_per_split) == {"train", "test", "contrast"}
    assert first.rows_per_split["train"] == 14 * 6
    assert first.revision.startswith("sha256-")
    assert len(first.class_names) == 196
    stored = first.load()
    assert isinstance(stored["train"].features["label"], datasets.ClassLabel)

    again = materialize_raw(str(demo_source), tmp_path)
    assert again.cache_hit and again.path == first.path and again.revision == first.revision


def test_fingerprint_follows_content(tmp_path):
    folder = write_source(
        tmp_path / "src", {"train": {"image": [{"bytes": _png(), "path": None}], "label": [0]}}, stanford_features()
    )
    before = local_fingerprint(folder)
    assert local_fingerprint(folder) == before
    (folder / "data" / "extra.txt").write_text("changed")
    assert local_fingerprint(folder) != before


def test_missing_source_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError, match="does not exist") as error:
        materialize_raw(str(missing), tmp_path)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("missing", ["label", "image"])
def test_source_missing_a_column_is_rejected(tmp_path, missing):
    columns = {"image": [{"bytes": _png(), "path": None}], "label": [0]}
    features = stanford_features()
    del columns[missing]
    del features[missing]
    folder = write_source(tmp_path / "src", {"train": columns, "test": columns}, features)
    with pytest.raises(SourceError, match=f"lacks column.*'{missing}'"):
        materialize_raw(str(folder), tmp_path / "home")


def test_label_column_that_is_not_a_classlabel_is_rejected(tmp_path):
    columns = {"image": [{"bytes": _png(), "path": None}], "label": ["Audi A5 Coupe 2012"]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    folder = write_source(tmp_path / "src", {"train": columns, "test": columns}, features)
    with pytest.raises(SourceError, match="not a ClassLabel"):
        materialize_raw(str(folder), tmp_path / "home")


def test_empty_split_is_rejected(tmp_path):
    good = {"image": [{"bytes": _png(), "path": None}], "label": [0]}
    folder = write_source(tmp_path / "src", {"train": good, "test": {"image": [], "label": []}}, stanford_features())
    with pytest.raises(SourceError, match="'test'.*empty"):
        materialize_raw(str(folder), tmp_path / "home")


def test_hub_source_offline_fails_fast_with_advice(tmp_path):
    started = time.perf_counter()
    with pytest.raises(SourceError) as error:
        resolve_revision("tanganke/stanford_cars")
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "tanganke/stanford_cars" in message and "CAR_MAKER_PROFILE=demo" in message and "local copy" in message


def test_real_profile_without_network_fails_within_seconds(tmp_path):
    """Not offline mode: the Hub endpoint simply does not answer (a closed loopback port)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "CAR_MAKER_PROFILE": "real",
        "CAR_MAKER_HOME": str(tmp_path),
    }
    code = (
        "from car_maker_pipeline.orchestration.resources import StanfordCarsSource\n"
        "from pathlib import Path\n"
        f"StanfordCarsSource().materialize(Path(r'{tmp_path}'))\n"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "SourceError" in result.stderr and "tanganke/stanford_cars" in result.stderr
    assert "CAR_MAKER_PROFILE=demo" in result.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"
