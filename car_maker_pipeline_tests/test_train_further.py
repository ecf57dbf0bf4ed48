"""Training further: continuing a finished run, shortening it, and which settings name its folder.

| request on a finished run of otherwise equal settings | expected                                             |
|-------------------------------------------------------|------------------------------------------------------|
| WSD, max_steps 4 -> 8                                 | resumes from the checkpoint at the decay's start (3), |
|                                                       | ends equal to an uninterrupted 8-step run: adapter    |
|                                                       | and optimizer state within 1e-6, same loss history    |
| linear (or cosine), max_steps 4 -> 8                  | LoraTrainingError naming 4, 8 and warmup_stable_decay |
|                                                       | before any model is loaded; fresh_start trains anew  |
| max_steps 8 -> 4 (any schedule)                       | trains nothing: the checkpoints up to step 4          |
| dataloader_num_workers, per_device_eval_batch_size,   | the same folder (fingerprint) and a resumable run     |
|   logging_steps, save_total_limit, max_steps changed  |                                                       |
| a folder named by the previous release                | found again, resumes                                  |
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from car_maker_pipeline.training.checkpoints import RUN_SETTINGS_FILE
from car_maker_pipeline.training.config import NON_MATHEMATICAL_FIELDS, LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.continuation import SUPERSEDED_DIR, find_training_dir, plan_run
from car_maker_pipeline.training.trainer import train_lora
from car_maker_pipeline_tests.support.checkpoints import marked_checkpoint

TINY = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 8, "lora_r": 4, "warmup_steps": 1, "bf16": False}
WSD = {**TINY, "lr_scheduler_type": "warmup_stable_decay", "decay_fraction": 0.34, "checkpoint_every_n_steps": 2}


@pytest.fixture(scope="module")
def data(maker_dataset):
    loaded = maker_dataset.load()
    return loaded["train"], loaded["validation"].select(range(8)), maker_dataset.makers


def _train(model_dir, data, out, **settings):
    train, validation, makers = data
    return train_lora(model_dir, train, validation, makers, out, LoraHyperparameters(**settings))


def _optimizer_tensors(checkpoint):
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return {(index, name): value for index, entry in state.items() for name, value in entry.items()}


def _losses(result):
    return [(entry["step"], entry["loss"]) for entry in result.log_history if "loss" in entry]


def test_a_continued_wsd_run_equals_an_uninterrupted_run_of_the_new_length(tiny_model_dir, data, tmp_path):
    uninterrupted = _train(tiny_model_dir, data, tmp_path / "six", max_steps=6, **WSD, logging_steps=1)
    assert sorted(uninterrupted.checkpoints) == [2, 4, 6]  # 4: where its decay begins (6 - round(6 * 0.34))
    short = _train(tiny_model_dir, data, tmp_path / "continued", max_steps=3, **WSD, logging_steps=1)
    assert sorted(short.checkpoints) == [2, 3]  # its decay began at step 2 (3 - round(3 * 0.34))

    continued = _train(tiny_model_dir, data, tmp_path / "continued", max_steps=6, **WSD, logging_steps=1)
    assert continued.resumed_from.name == "checkpoint-2" and continued.superseded == [3]
    assert continued.plan == "continued a 3-step run to 6 steps from step 2"
    assert sorted(continued.checkpoints) == [2, 4, 6]
    assert any(p.name.startswith("checkpoint-3-") for p in (tmp_path / "continued" / SUPERSEDED_DIR).iterdir())
    final, reference = continued.final_checkpoint, uninterrupted.final_checkpoint
    adapter, expected = load_file(final / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(adapter[key], expected[key], atol=1e-6, rtol=0)
    moments, expected_moments = _optimizer_tensors(final), _optimizer_tensors(reference)
    assert moments.keys() == expected_moments.keys()
    for key in expected_moments:
        torch.testing.assert_close(moments[key], expected_moments[key], atol=1e-6, rtol=0)
    assert [s for s, _ in _losses(continued)] == list(range(1, 7))
    assert [s for s, _ in _losses(uninterrupted)] == list(range(1, 7))
    assert [loss for _, loss in _losses(continued)] == pytest.approx([loss for _, loss in _losses(uninterrupted)], abs=1e-6)
    # A rerun of the continued run trains nothing; the shortened request reuses its checkpoints.
    again = _train(tiny_model_dir, data, tmp_path / "continued", max_steps=6, **WSD)
    assert again.train_seconds == 0.0 and again.global_step == 6
    shorter = _train(tiny_model_dir, data, tmp_path / "continued", max_steps=5, **WSD)
    assert (shorter.train_seconds, shorter.global_step, sorted(shorter.checkpoints)) == (0.0, 4, [2, 4])
