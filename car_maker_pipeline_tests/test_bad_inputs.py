"""Bad inputs across data, config and models: each ends in a clear message or a counted skip.

| #  | input                                              | documented behaviour                                                  | test |
|----|----------------------------------------------------|-----------------------------------------------------------------------|------|
| 1  | decompression-bomb-sized image (81 Mpx)            | counted in `dropped_undecodable`, the rest of the split kept          | test_bomb_sized_image_is_counted_and_skipped |
| 2  | 1x1 image                                          | kept; the classifier answers a maker for it                           | test_one_pixel_image_is_kept_and_classified |
| 3  | animated GIF                                       | kept: its first frame, as RGB                                         | test_animated_gif_keeps_its_first_frame |
| 4  | 16-bit grayscale PNG                               | kept: scaled to 8 bits, not clipped to white                          | test_sixteen_bit_png_is_scaled_not_clipped |
| 5  | JPEG with EXIF orientation 6 (rotated)             | kept upright (EXIF rotation applied once)                             | test_exif_rotation_is_applied |
| 6  | truncated JPEG                                     | counted in `dropped_undecodable`                                      | test_truncated_image_is_counted_and_skipped |
| 7  | 500:1 strip in a batch with a photo                | padded to 8:1; both get a maker                                       | test_extreme_strip_and_photo_classify_in_one_batch |
| 8  | label outside the ClassLabel range (-1, 196)       | counted in `dropped_bad_label`                                        | test_labels_outside_the_class_range_are_counted |
| 9  | `label` column of the wrong type (strings)         | MakerDatasetError naming the column and ClassLabel                    | test_label_column_of_the_wrong_type_is_rejected |
| 10 | duplicated rows                                    | counted in `dropped_duplicate`, first occurrence kept                 | test_duplicated_rows_are_counted_and_kept_once |
| 11 | class names differing in case and whitespace       | mapped to the same makers                                             | test_class_names_in_other_case_and_spacing_map_to_the_same_makers |
| 12 | class name of no known maker                       | UnknownClassNameError listing every such name                         | test_unknown_class_names_are_all_reported |
| 13 | negative learning rate                             | rejected by config validation, nothing trained or written             | test_out_of_range_hyperparameters_are_rejected_before_training |
| 14 | LoRA r = 0                                         | same                                                                  | (same, parametrized) |
| 15 | checkpoint interval larger than the run            | same                                                                  | (same, parametrized) |
| 16 | batch size 0                                       | same                                                                  | (same, parametrized) |
| 16b | LoRA dropout 1.0; empty target_modules list       | same                                                                  | (same, parametrized) |
| 17 | prompt without the `{makers}` placeholder          | rejected by config validation, names the placeholder                  | test_prompt_without_the_maker_list_is_rejected |
| 18 | checkpoint directory from another base model       | AdapterMismatchError naming both models                               | test_checkpoint_from_another_base_model_is_rejected |
| 19 | model folder with pickled weights only (no safetensors) | ModelLoadError naming the missing safetensors                    | test_model_folder_without_safetensors_is_rejected |
| 20 | LoRA target module that matches nothing            | LoraTrainingError before training, listing existing layer names       | test_lora_target_that_matches_nothing_is_rejected |
| 21 | unreadable file given to `classify`                | exit code 2 and a message naming the file                             | test_classify_rejects_an_unreadable_image |
| 22 | so few training images that 10% is under one per maker | validation gets one per maker; a maker with 1 image: MakerDatasetError | test_small_sources_keep_one_validation_image_per_maker |

The Dagster cases (13-17) run against a store that already holds a materialized maker dataset and
check that it is untouched afterwards.
"""

from __future__ import annotations

import io
import re
import shutil

import dagster as dg
import datasets
import numpy as np
import pytest
from PIL import Image

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.maker_dataset import MakerDatasetError, MakerDatasetParams, build_maker_dataset

NAMES = list(stanford_cars_class_names())
BMW = NAMES.index(next(n for n in NAMES if n.startswith("BMW ")))
LAND_ROVER = NAMES.index(next(n for n in NAMES if n.startswith("Land Rover ")))


def photo(seed: int, size=(48, 32), fmt="JPEG", mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def raw_source(
    train: list[tuple[bytes, int]], test: list[tuple[bytes, int]] | None = None, names=NAMES
) -> datasets.DatasetDict:
    """A Stanford-Cars-shaped DatasetDict; train gets 3 ordinary images per maker so a split can be carved."""
    base = [(photo(100 + i), label) for i, label in enumerate([BMW, BMW, BMW, LAND_ROVER, LAND_ROVER, LAND_ROVER])]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(rows):
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [label for _, label in rows]},
            features=features,
        )

    return datasets.DatasetDict(
        {"train": split(base + train), "test": split(test or [(photo(200), BMW), (photo(201), LAND_ROVER)])}
    )


def build(tmp_path, raw):
    return build_maker_dataset(raw, tmp_path / "built", MakerDatasetParams(validation_fraction=0.25, num_proc=1))


def stored_image(record, split: str, index: int) -> Image.Image:
    return record.load()[split][index]["image"]


# ---------------------------------------------------------------------------------------------- images


def test_bomb_sized_image_is_counted_and_skipped(tmp_path):
    bomb = Image.new("1", (9000, 9000))  # 81 Mpx: over the pipeline's 64 Mpx limit, a few KB as PNG
    buffer = io.BytesIO()
    bomb.save(buffer, format="PNG")
    record = build(tmp_path, raw_source([(buffer.getvalue(), BMW)]))
    assert record.dropped_undecodable["train"] == 1
    assert record.rows_per_split["train"] + record.rows_per_split["validation"] == 6


def test_one_pixel_image_is_kept_and_classified(tmp_path, tiny_model):
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier

    record = build(tmp_path, raw_source([], test=[(photo(1, size=(1, 1), fmt="PNG"), BMW), (photo(2), LAND_ROVER)]))
    assert record.dropped_total == 0
    image = stored_image(record, "test", 0)
    assert image.size == (1, 1)
    predictions = MakerClassifier(tiny_model.model, tiny_model.processor, record.makers).classify([image])
    assert predictions[0].maker in record.makers


def test_animated_gif_keeps_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 30), color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    record = build(tmp_path, raw_source([], test=[(buffer.getvalue(), BMW), (photo(2), LAND_ROVER)]))
    image = stored_image(record, "test", 0)
    assert record.dropped_total == 0 and image.mode == "RGB" and image.size == (40, 30)
    red, green, blue = image.getpixel((5, 5))
    assert red > 150 and green < 50 and blue < 50  # the first (red) frame


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 64, dtype=np.uint16), (16, 1))  # a 12-bit sensor's range in 16-bit PNG
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    record = build(tmp_path, raw_source([], test=[(buffer.getvalue(), BMW), (photo(2), LAND_ROVER)]))
    pixels = np.asarray(stored_image(record, "test", 0))
    assert pixels.shape == (16, 64, 3)
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and 100 < pixels[0, 32, 0] < 160  # a ramp, not all white


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    record = build(tmp_path, raw_source([], test=[(buffer.getvalue(), BMW), (photo(2), LAND_ROVER)]))
    upright = stored_image(record, "test", 0)
    assert upright.size == (20, 60)
    assert np.asarray(upright)[:5].mean() > 200  # the left band is now on top


def test_truncated_image_is_counted_and_skipped(tmp_path):
    record = build(tmp_path, raw_source([(photo(7, size=(200, 150))[:300], BMW)]))
    assert record.dropped_undecodable == {"train": 1, "test": 0}


def test_extreme_strip_and_photo_classify_in_one_batch(tiny_model):
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier
    from car_maker_pipeline.model_inputs.images import model_ready

    strip, picture = Image.new("RGB", (5000, 10), (9, 9, 9)), Image.new("RGB", (64, 48))
    assert model_ready(strip).size == (5000, 625) and model_ready(picture) is picture
    predictions = MakerClassifier(tiny_model.model, tiny_model.processor, ["BMW", "Land Rover"], batch_size=4).classify(
        [strip, picture]
    )
    assert [p.maker in ("BMW", "Land Rover") for p in predictions] == [True, True]


# ---------------------------------------------------------------------------------------------- labels and rows


def test_labels_outside_the_class_range_are_counted(tmp_path):
    raw = raw_source([])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    extra = datasets.Dataset.from_dict(
        {"image": [{"bytes": photo(30), "path": None}, {"bytes": photo(31), "path": None}], "label": [-1, 196]},
        features=features,
    )
    # Arrow stores any int64; only the ClassLabel's range says which are valid.
    train = datasets.concatenate_datasets([raw["train"].cast_column("label", datasets.Value("int64")), extra])
    raw["train"] = _force_class_label(train)
    record = build(tmp_path, raw)
    assert record.dropped_bad_label == {"train": 2, "test": 0}
    assert record.dropped_undecodable == {"train": 0, "test": 0}


def _force_class_label(part: datasets.Dataset) -> datasets.Dataset:
    """Relabel the schema as ClassLabel without datasets' range check, as a hand-written parquet would arrive."""
    table = part.data.table
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))


def test_label_column_of_the_wrong_type_is_rejected(tmp_path):
    raw = raw_source([])
    raw["train"] = (
        raw["train"].cast_column("label", datasets.Value("int64")).cast_column("label", datasets.Value("string"))
    )
    with pytest.raises(MakerDatasetError, match=r"'label' column of type .*string.* must be a ClassLabel"):
        build(tmp_path, raw)
    assert not (tmp_path / "built").exists()


def test_duplicated_rows_are_counted_and_kept_once(tmp_path):
    same = photo(40)
    record = build(
        tmp_path,
        raw_source(
            [(same, BMW), (same, BMW), (same, BMW)], test=[(photo(41), BMW), (photo(41), BMW), (photo(42), LAND_ROVER)]
        ),
    )
    assert record.dropped_duplicate == {"train": 2, "test": 1}
    assert record.rows_per_split["test"] == 2
    assert record.rows_per_split["train"] + record.rows_per_split["validation"] == 7
    assert record.dropped_total == 3


def test_class_names_in_other_case_and_spacing_map_to_the_same_makers(tmp_path):
    messy = [f"  {n.upper()} " if i % 2 else n.replace(" ", "  ").lower() for i, n in enumerate(NAMES)]
    clean = build(tmp_path / "clean", raw_source([]))
    record = build(tmp_path / "messy", raw_source([], names=messy))
    assert record.makers == clean.makers == ["BMW", "Land Rover"]


def test_unknown_class_names_are_all_reported(tmp_path):
    from car_maker_pipeline.data.makers import UnknownClassNameError

    odd = NAMES.copy()
    odd[5], odd[7] = "Zastava Yugo 1987", "Trabant 601 1980"
    with pytest.raises(UnknownClassNameError) as error:
        build(tmp_path, raw_source([], names=odd))
    assert "Zastava Yugo 1987" in str(error.value) and "Trabant 601 1980" in str(error.value)


def test_small_sources_keep_one_validation_image_per_maker(tmp_path):
    raw = raw_source([])  # 6 train images of 2 makers: 10% would be 0.6 of a row
    record = build_maker_dataset(raw, tmp_path / "ok", MakerDatasetParams(validation_fraction=0.1, num_proc=1))
    assert record.images_per_maker["validation"] == {"BMW": 1, "Land Rover": 1}
    assert record.rows_per_split["train"] == 4
    raw["train"] = raw["train"].select([0, 1, 2, 3])  # Land Rover has one image left: it cannot be in both
    with pytest.raises(MakerDatasetError, match=r"\['Land Rover'\] have fewer than 2 training images"):
        build_maker_dataset(raw, tmp_path / "too_small", MakerDatasetParams(validation_fraction=0.1, num_proc=1))


# ---------------------------------------------------------------------------------------------- config, through Dagster


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """A store holding a materialized maker dataset, which the rejected runs below must leave alone."""
    from car_maker_pipeline_tests.support.pipeline import materialized_demo_data

    home = tmp_path_factory.mktemp("bad_config")
    resources, instance, _ = materialized_demo_data(home, train_per_maker=6, test_per_maker=2, corruptions=[])
    return home, resources, instance


def _store_snapshot(home):
    manifest = home / "car_maker_dataset" / "current.json"
    return manifest.read_text(), sorted(p.name for p in home.iterdir())


def _rejected(materialized, asset, config: dict, partition="tiny-s|maker") -> str:
    home, resources, instance = materialized
    before = _store_snapshot(home)
    result = dg.materialize(
        [asset],
        resources=resources,
        instance=instance,
        partition_key=partition,
        run_config={"ops": {asset.key.path[-1]: {"config": config}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.error.to_string()
    # Nothing ran: no asset folder was created, no MLflow run opened, the earlier materialization is untouched.
    assert _store_snapshot(home) == before
    assert not (home / asset.key.path[-1]).exists()
    return message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("learning_rate", -1e-3, r"learning_rate\s+Input should be greater than 0"),
        ("lora_r", 0, r"lora_r\s+Input should be greater than 0"),
        ("per_device_train_batch_size", 0, r"per_device_train_batch_size\s+Input should be greater than 0"),
        ("checkpoint_every_n_steps", 500, r"checkpoint_every_n_steps \(500\) is larger than max_steps \(400\)"),
        ("lora_dropout", 1.0, r"lora_dropout\s+Input should be less than 1"),
        ("target_modules", [], r"target_modules\s+List should have at least 1 item"),
    ],
)
def test_out_of_range_hyperparameters_are_rejected_before_training(materialized, field, value, expected):
    from car_maker_pipeline.orchestration.assets.training import LoraTrainingConfig, lora_checkpoints
    from car_maker_pipeline.training.config import LoraHyperparameters

    with pytest.raises(ValueError, match=expected):
        LoraTrainingConfig(**{field: value})
    with pytest.raises(ValueError, match=expected):  # the plain functions take the same schema
        LoraHyperparameters(**{field: value})
    assert re.search(expected, _rejected(materialized, lora_checkpoints, {field: value}))


def test_prompt_without_the_maker_list_is_rejected(materialized):
    from car_maker_pipeline.model_inputs.prompt import PromptError, PromptTemplate
    from car_maker_pipeline.orchestration.assets.baseline import baseline_evaluation

    with pytest.raises(PromptError, match=r"no '\{makers\}' placeholder"):
        PromptTemplate(user="Which car brand is this?")
    message = _rejected(materialized, baseline_evaluation, {"user_prompt": "Which car brand is this?"})
    assert "{makers}" in message and "Which car brand is this?" in message


# ---------------------------------------------------------------------------------------------- models


def test_checkpoint_from_another_base_model_is_rejected(tmp_path, tiny_model_dir, maker_dataset):
    from peft import LoraConfig, get_peft_model

    from car_maker_pipeline.models.loading import AdapterMismatchError, attach_adapter, load_model_and_processor
    from car_maker_pipeline.offline.tiny_models import build_tiny_model

    other_dir = build_tiny_model(tmp_path / "tiny-m", "tiny-m", seed=0)
    other = load_model_and_processor(str(other_dir)).model
    adapter = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "checkpoint-10")

    base = load_model_and_processor(str(tiny_model_dir)).model
    with pytest.raises(AdapterMismatchError) as error:
        attach_adapter(base, tmp_path / "checkpoint-10")
    message = str(error.value)
    assert "checkpoint-10" in message and str(other_dir) in message and str(tiny_model_dir) in message
    assert "size mismatch" in message and "this model's own lora_checkpoints partition" in message


def test_model_folder_without_safetensors_is_rejected(tmp_path, tiny_model_dir):
    from car_maker_pipeline.models.loading import ModelLoadError, load_model_and_processor

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_name("pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match=r"missing \*\.safetensors"):
        load_model_and_processor(str(pickled))


def test_lora_target_that_matches_nothing_is_rejected(tiny_model):
    from car_maker_pipeline.training.targets import LoraTrainingError, match_target_modules

    with pytest.raises(LoraTrainingError) as error:
        match_target_modules(tiny_model.model, ["q_proj", "gate_proj", "o_proj"])
    assert "['gate_proj', 'o_proj']" in str(error.value) and "in_proj" in str(error.value)


def test_classify_rejects_an_unreadable_image(tmp_path, capsys):
    from car_maker_pipeline.classify import main

    broken = tmp_path / "car.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main([str(broken), "--adapter", str(tmp_path)]) == 2
    assert f"{broken}: not a readable image" in capsys.readouterr().err
