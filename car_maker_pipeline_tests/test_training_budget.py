"""Training at mixed picture sizes: the image-token budget travels with the run, batches group by cost.

| case                                             | expected                                                  |
|--------------------------------------------------|-----------------------------------------------------------|
| budget max 24 in the hyperparameters             | processor set to it; the result (and manifest) records it |
| group_by_image_tokens                            | length column = image tokens; length-grouped sampler      |
| default hyperparameters                          | no length column, random sampler (demo unchanged)         |
| min_image_tokens > max_image_tokens              | rejected when the hyperparameters are built               |
| checkpoint scored with the training budget       | no warning                                                |
| evaluation asks for another max                  | the evaluation's value, with a warning naming both        |
"""

from __future__ import annotations

import datasets
import pytest
from PIL import Image
from pydantic import ValidationError
from transformers.trainer_pt_utils import LengthGroupedSampler

from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget, budget_for_checkpoint, image_token_count
from car_maker_pipeline.training.config import LoraHyperparameters
from car_maker_pipeline.training.trainer import build_trainer, train_lora

MAKERS = ["AM General", "BMW"]
SIZES = [(128, 96), (40, 30), (200, 60), (64, 64), (300, 100), (30, 90), (128, 96), (50, 50)]


@pytest.fixture(scope="module")
def mixed_sizes():
    colours = ["red", "navy", "olive", "teal"]
    images = [Image.new("RGB", size, colours[i % 4]) for i, size in enumerate(SIZES)]
    return datasets.Dataset.from_dict(
        {"image": images, "maker": [MAKERS[i % 2] for i in range(len(SIZES))]},
        features=datasets.Features({"image": datasets.Image(), "maker": datasets.Value("string")}),
    )


def test_budget_and_length_grouping_in_a_real_run(tiny_model_dir, mixed_sizes, tmp_path):
    hyperparameters = LoraHyperparameters(
        max_steps=2, checkpoint_every_n_steps=2, per_device_train_batch_size=4, max_image_tokens=24,
        group_by_image_tokens=True,
    )  # fmt: skip
    trainer, _ = build_trainer(tiny_model_dir, mixed_sizes, None, MAKERS, tmp_path / "probe", hyperparameters)
    processor = trainer.processing_class
    assert processor.image_processor.max_image_tokens == 24
    lengths = trainer.train_dataset["length"]
    assert lengths == [image_token_count(processor.image_processor, *size) for size in SIZES]
    assert len(set(lengths)) > 2 and max(lengths) <= 24
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)

    result = train_lora(tiny_model_dir, mixed_sizes, mixed_sizes, MAKERS, tmp_path / "run", hyperparameters)
    assert result.global_step == 2
    assert result.image_token_budget == {"min_image_tokens": 16, "max_image_tokens": 24, "do_image_splitting": False}
    assert type(result).from_json(result.to_json()).image_token_budget == result.image_token_budget


def test_defaults_leave_the_demo_as_it_was(tiny_model_dir, mixed_sizes, tmp_path):
    trainer, _ = build_trainer(tiny_model_dir, mixed_sizes, None, MAKERS, tmp_path / "probe", LoraHyperparameters())
    assert "length" not in trainer.train_dataset.column_names
    assert not isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    assert trainer.processing_class.image_processor.max_image_tokens == 48  # the tiny model's own


def test_an_impossible_training_budget_is_rejected():
    with pytest.raises(ValidationError, match="min_image_tokens"):
        LoraHyperparameters(min_image_tokens=64, max_image_tokens=32)


def test_checkpoints_are_scored_with_their_training_budget():
    trained = {"min_image_tokens": 16, "max_image_tokens": 24, "do_image_splitting": False}
    chosen, warning = budget_for_checkpoint(trained, ImageTokenBudget())
    assert chosen == ImageTokenBudget(16, 24, False) and warning is None
    chosen, warning = budget_for_checkpoint(trained, ImageTokenBudget(max_image_tokens=48))
    assert chosen.max_image_tokens == 48 and "max_image_tokens 24 (training) vs 48 (evaluation)" in warning
    assert budget_for_checkpoint(None, ImageTokenBudget()) == (ImageTokenBudget(), None)  # runs recorded before
