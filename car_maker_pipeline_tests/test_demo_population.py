"""The demo source's maker balance and image sizes (offline/population.py).

| case                                        | expected                                                     |
|---------------------------------------------|--------------------------------------------------------------|
| uniform, no total                           | per_maker each                                               |
| stanford, demo makers                       | shares follow real class counts (BMW 13 : AM General 1)      |
| stanford, all 49 makers, total 8,144         | exactly 8,144 rows; Chevrolet 22x a one-class maker (+-1)    |
| uniform with a total that does not divide   | exactly that total, makers differ by at most one             |
| unknown balance / image_sizes               | ValueError naming the choices                                |
| realistic sizes                             | thumbnails (<200 px), photos, >2,000 px and >=2.5:1 wide     |
| generated realistic, stanford source        | stored sizes vary, rows per maker as planned                 |
| the demo profile's source, all defaults     | stanford shares; every maker >= 2 train, >= 1 validation row |
"""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest

from car_maker_pipeline.data.makers import maker_of
from car_maker_pipeline.offline.demo_source import DEMO_MAKERS, generate_demo_source
from car_maker_pipeline.offline.population import images_per_maker, realistic_image_size
from car_maker_pipeline.offline.rendering import classes_by_maker

CLASS_COUNTS = {maker: len(classes) for maker, classes in classes_by_maker().items()}


def test_uniform_gives_every_maker_the_same_count():
    assert images_per_maker(DEMO_MAKERS, 7, "uniform", CLASS_COUNTS) == dict.fromkeys(DEMO_MAKERS, 7)


def test_stanford_balance_follows_real_class_counts():
    counts = images_per_maker(DEMO_MAKERS, 60, "stanford", CLASS_COUNTS)
    assert sum(counts.values()) == 360
    assert counts["BMW"] > counts["Mercedes-Benz"] > counts["Aston Martin"] > counts["Land Rover"]
    assert counts["BMW"] / counts["AM General"] == pytest.approx(13, rel=0.1)


def test_stanford_scale_matches_the_real_train_split_exactly():
    makers = sorted(CLASS_COUNTS)
    counts = images_per_maker(makers, 0, "stanford", CLASS_COUNTS, total=8144)
    assert len(makers) == 49 and sum(counts.values()) == 8144
    assert abs(counts["Chevrolet"] - 22 * counts["Tesla"]) <= 22


def test_uniform_total_is_exact_and_even():
    counts = images_per_maker(DEMO_MAKERS, 0, "uniform", CLASS_COUNTS, total=100)
    assert sum(counts.values()) == 100 and max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(("option", "value"), [("balance", "skewed"), ("image_sizes", "huge")])
def test_unknown_options_are_refused(tmp_path, option, value):
    with pytest.raises(ValueError, match="use one of"):
        generate_demo_source(tmp_path / "src", train_per_maker=2, test_per_maker=1, corruptions=(), **{option: value})


def test_realistic_sizes_cover_every_token_regime():
    rng = np.random.default_rng(1)
    sizes = [realistic_image_size(rng) for _ in range(3000)]
    widths = np.array([w for w, _ in sizes])
    aspects = np.array([w / h for w, h in sizes])
    assert (widths < 200).mean() > 0.03  # thumbnails: the smallest token counts
    assert ((widths > 300) & (widths < 1200)).mean() > 0.4  # ordinary photos
    assert (widths > 2000).mean() > 0.05  # multi-tile photos
    assert (aspects >= 2.5).mean() > 0.03  # wide strips: 1x4 to 1x8 tiles
    assert min(h for _, h in sizes) >= 16


def test_generated_realistic_stanford_source(tmp_path):
    out = generate_demo_source(
        tmp_path / "src",
        train_per_maker=8,
        test_per_maker=2,
        corruptions=(),
        image_sizes="realistic",
        balance="stanford",
    )
    train = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    names = train.features["label"].names
    per_maker = Counter(maker_of(names[label]) for label in train["label"])
    assert per_maker == Counter(images_per_maker(DEMO_MAKERS, 8, "stanford", CLASS_COUNTS))
    sizes = {image.size for image in train["image"]}
    assert len(sizes) > 20 and max(w for w, _ in sizes) > 4 * min(w for w, _ in sizes)


def test_the_demo_profile_draws_real_proportions_and_keeps_every_maker_in_train_and_validation(tmp_path):
    from car_maker_pipeline.data.maker_dataset import build_maker_dataset
    from car_maker_pipeline.orchestration.resources import StanfordCarsSource
    from car_maker_pipeline.store import PipelineStore

    source = StanfordCarsSource(profile="demo")  # every demo setting at its default
    assert source.demo_balance == "stanford"
    raw = source.materialize(PipelineStore(tmp_path / "home"))
    record = build_maker_dataset(raw.load(), tmp_path / "dataset", source_revision=raw.revision)
    train, validation = record.images_per_maker["train"], record.images_per_maker["validation"]
    planned = images_per_maker(DEMO_MAKERS, source.demo_train_per_maker, "stanford", CLASS_COUNTS)
    assert {maker: train[maker] + validation.get(maker, 0) for maker in DEMO_MAKERS} == planned
    assert source.demo_train_per_maker == 360 and planned["BMW"] == 968 and planned["AM General"] == 75
    assert min(train.values()) >= 2 and set(validation) == set(DEMO_MAKERS) and min(validation.values()) >= 1
    assert record.images_per_maker["test"] == images_per_maker(
        DEMO_MAKERS, source.demo_test_per_maker, "stanford", CLASS_COUNTS
    )
