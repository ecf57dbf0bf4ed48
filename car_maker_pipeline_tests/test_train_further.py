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

TINY = {
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 8,
    "lora_r": 4,
    "warmup_steps": 1,
    "bf16": False,
}
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
    adapter, expected = (
        load_file(final / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert adapter.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(adapter[key], expected[key], atol=1e-6, rtol=0)
    moments, expected_moments = _optimizer_tensors(final), _optimizer_tensors(reference)
    assert moments.keys() == expected_moments.keys()
    for key in expected_moments:
        torch.testing.assert_close(moments[key], expected_moments[key], atol=1e-6, rtol=0)
    assert [s for s, _ in _losses(continued)] == list(range(1, 7))
    assert [s for s, _ in _losses(uninterrupted)] == list(range(1, 7))
    assert [loss for _, loss in _losses(continued)] == pytest.approx(
        [loss for _, loss in _losses(uninterrupted)], abs=1e-6
    )
    # A rerun of the continued run trains nothing; the shortened request reuses its checkpoints.
    again = _train(tiny_model_dir, data, tmp_path / "continued", max_steps=6, **WSD)
    assert again.train_seconds == 0.0 and again.global_step == 6
    shorter = _train(tiny_model_dir, data, tmp_path / "continued", max_steps=5, **WSD)
    assert (shorter.train_seconds, shorter.global_step, sorted(shorter.checkpoints)) == (0.0, 4, [2, 4])


def _finished_run(folder, max_steps, **settings):
    """A hand-made finished run: settings recorded, checkpoints every 2 steps whose state says `max_steps`."""
    hyper = LoraHyperparameters(max_steps=max_steps, checkpoint_every_n_steps=2, **settings)
    for step in range(2, max_steps + 1, 2):
        state = json.dumps({"global_step": step, "max_steps": max_steps, "log_history": []})
        marked_checkpoint(folder, step, content=state.replace("{", "{{").replace("}", "}}"))
    (folder / RUN_SETTINGS_FILE).write_text(json.dumps({"config": hyper.to_json(), "makers": ["A"], "model": "m"}))
    return hyper


@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial"])
def test_extending_a_schedule_that_decays_over_the_whole_run_is_refused_before_any_work(schedule, tmp_path):
    _finished_run(tmp_path / "run", 4, lr_scheduler_type=schedule)
    longer = LoraHyperparameters(max_steps=8, checkpoint_every_n_steps=2, lr_scheduler_type=schedule)
    with pytest.raises(LoraTrainingError, match=r"trained for 4 steps.*to 8 steps.*warmup_stable_decay"):
        plan_run(tmp_path / "run", longer)
    # train_lora refuses before it loads a model: the recorded model "m" is no folder at all.
    with pytest.raises(LoraTrainingError, match="warmup_stable_decay"):
        train_lora("m", None, None, ["A"], tmp_path / "run", longer)  # "m": no such model folder
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4", RUN_SETTINGS_FILE]


@pytest.mark.parametrize(
    ("schedule", "settings", "wanted", "expected"),
    [  # (kind, resume step, final step, superseded)
        ("warmup_stable_decay", {"decay_fraction": 0.5}, 16, ("continue", 4, None, [6, 8])),  # 8-step decay began at 4
        ("warmup_stable_decay", {"decay_fraction": 0.2}, 12, ("continue", 6, None, [8])),  # round(1.6) = 2: at 6
        ("constant", {}, 12, ("continue", 8, None, [])),  # no decay at all: from the last step
        ("constant_with_warmup", {"warmup_steps": 3}, 10, ("continue", 8, None, [])),
        ("linear", {}, 8, ("finished", 8, 8, [])),
        ("linear", {}, 5, ("shorten", 4, 4, [])),  # trains nothing; the checkpoints up to step 5
        ("warmup_stable_decay", {}, 2, ("shorten", 2, 2, [])),
    ],
)
def test_what_another_max_steps_means_for_a_finished_run(schedule, settings, wanted, expected, tmp_path):
    _finished_run(tmp_path / "run", 8, lr_scheduler_type=schedule, **settings)
    request = LoraHyperparameters(max_steps=wanted, checkpoint_every_n_steps=2, lr_scheduler_type=schedule, **settings)
    plan = plan_run(tmp_path / "run", request)
    resumed = int(plan.resume_from.name.split("-")[-1]) if plan.resume_from else None
    assert (plan.kind, resumed, plan.final_step, plan.superseded) == expected


def test_only_the_maths_name_the_training_folder():
    default = LoraHyperparameters()
    for name in NON_MATHEMATICAL_FIELDS:
        value = {"dataloader_num_workers": 3, "per_device_eval_batch_size": 5, "logging_steps": 1}.get(name, 2)
        assert LoraHyperparameters(**{name: value}).fingerprint(num_processes=1) == default.fingerprint(num_processes=1)
    same = [
        {"max_steps": 800},
        {"early_stopping_patience": 2, "early_stopping_min_delta": 0.01},
        {"decay_fraction": 0.3},
    ]
    for settings in same:  # the run's length, early stopping, and a setting of a schedule not in use
        assert LoraHyperparameters(**settings).fingerprint(num_processes=1) == default.fingerprint(num_processes=1)
    different = [{"learning_rate": 1e-3}, {"lora_r": 4}, {"seed": 1}, {"lr_scheduler_type": "warmup_stable_decay"}]
    names = {LoraHyperparameters(**settings).fingerprint(num_processes=1) for settings in different}
    assert len(names) == len(different) and default.fingerprint(num_processes=1) not in names
    assert default.fingerprint(num_processes=2) != default.fingerprint(num_processes=1)
    assert LoraHyperparameters(fresh_start=True).fingerprint(num_processes=1) not in {
        default.fingerprint(num_processes=1)
    }
    wsd = LoraHyperparameters(lr_scheduler_type="warmup_stable_decay")
    assert wsd.fingerprint(num_processes=1) != LoraHyperparameters(
        lr_scheduler_type="warmup_stable_decay", decay_fraction=0.3
    ).fingerprint(num_processes=1)


@pytest.mark.parametrize(
    ("settings", "legacy_suffix"),
    [  # folder names the previous release gave (computed by its code), for settings it could express
        ({}, "ecd59c2dd8"),
        ({"max_steps": 8, "checkpoint_every_n_steps": 4, "per_device_train_batch_size": 4}, "0d40d998ae"),
    ],
)
def test_a_folder_named_by_the_previous_release_is_found_and_resumed(settings, legacy_suffix, tmp_path):
    hyper = LoraHyperparameters(**settings)
    assert hyper.legacy_fingerprint(num_processes=1) == legacy_suffix
    legacy = tmp_path / f"dataset-abc-{legacy_suffix}"
    legacy.mkdir()
    marked_checkpoint(legacy, hyper.checkpoint_every_n_steps)
    (legacy / RUN_SETTINGS_FILE).write_text(json.dumps({"config": hyper.to_json(), "makers": ["A"], "model": "m"}))
    assert find_training_dir(tmp_path, "dataset-abc", hyper, 1) == legacy
    # Settings that do not change the maths find it too; other maths, or another process count, do not.
    workers = hyper.model_copy(update={"dataloader_num_workers": 4, "logging_steps": 1})
    assert find_training_dir(tmp_path, "dataset-abc", workers, 1) == legacy
    assert find_training_dir(tmp_path, "dataset-abc", hyper.model_copy(update={"seed": 9}), 1) != legacy
    assert find_training_dir(tmp_path, "dataset-abc", hyper, 2) != legacy
    assert find_training_dir(tmp_path, "other-dataset", hyper, 1) != legacy


@pytest.mark.parametrize(
    ("accuracies", "patience", "min_delta", "stops_at"),
    [
        ([0.5, 0.6, 0.7, 0.8], 1, 0.0, None),  # always improving
        ([0.5, 0.5, 0.5], 2, 0.0, 3),  # equal is no gain
        ([0.5, 0.6, 0.55, 0.61, 0.6], 2, 0.0, None),  # 0.61 is a gain after one without
        ([0.5, 0.6, 0.55, 0.61, 0.6], 2, 0.02, 4),  # ... but not one of at least 0.02 (step 4 ends it)
        ([0.5, 0.6, 0.55, 0.6, 0.61], 2, 0.0, 4),  # back to the best is no gain
        ([0.5, 0.4, 0.3, 0.2], 3, 0.0, 4),
        ([0.9], 1, 0.0, None),
    ],
)
def test_early_stopping_rule(accuracies, patience, min_delta, stops_at):
    from car_maker_pipeline.training.early_stopping import EarlyStopping

    scores = {step: {"val_accuracy": value} for step, value in enumerate(accuracies, start=1)}
    assert EarlyStopping(patience, min_delta).stop_step(scores) == stops_at


def test_a_run_stops_early_on_a_plateau_of_validation_accuracy_and_stays_stopped(tiny_model_dir, data, tmp_path):
    # A learning rate too small to change any answer: validation accuracy is flat from the first checkpoint.
    flat = {**TINY, "learning_rate": 1e-12, "max_steps": 6, "checkpoint_every_n_steps": 1, "early_stopping_patience": 2}
    stopped = _train(tiny_model_dir, data, tmp_path / "run", **flat)
    assert (stopped.global_step, sorted(stopped.checkpoints), stopped.stop["step"]) == (3, [1, 2, 3], 3)
    assert "early stopping" in stopped.stop["reason"] and "stopped at step 3" in stopped.stop["reason"]
    assert sorted(stopped.validation_scores) == [1, 2, 3]
    assert len({scores["val_accuracy"] for scores in stopped.validation_scores.values()}) == 1
    again = _train(tiny_model_dir, data, tmp_path / "run", **flat)  # a rerun does not train on
    assert (again.train_seconds, again.global_step, again.stop["step"]) == (0.0, 3, 3)
    with pytest.raises(ValueError, match="early_stopping_patience"):
        LoraHyperparameters(early_stopping_patience=0)
