"""Where the time goes: every checkpoint scored on one pass over the pictures; data workers from the machine.

| case                                                         | expected                                                   |
|--------------------------------------------------------------|------------------------------------------------------------|
| 3 checkpoints (random LoRA weights) scored by `score_checkpoints` | every maker's log-probability per image equals each checkpoint scored alone on its own model, to 1e-5; the checkpoints differ |
| processor calls while scoring 3 checkpoints                  | each validation and test picture prepared once (not 3 times) |
| a 4th checkpoint added, scored again                         | only it is scored (one preparation per picture); the cached results are not rewritten |
| all scored, asked again                                      | no picture prepared at all                                  |
| data workers: no GPU (any cores) / GPU with 16, 4, 2, 1 cores / 16 cores shared by 4 processes / 64 cores | 0 / 8 (capped), 3, 1, 0 / 3 / 8 |
| training config with workers unset, 0 or 3                   | SFTConfig gets the machine's choice, 0, 3 (persistent workers when > 0); one folder name for all, old and new |
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from car_maker_pipeline.evaluation.checkpoint_scores import score_checkpoints
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
from car_maker_pipeline.machine import MAX_DATA_WORKERS, machine_data_workers
from car_maker_pipeline.models.checkpoint_marker import mark_checkpoint_complete
from car_maker_pipeline.models.loading import attach_adapter

SPLITS = ("validation", "test")


class CountingProcessor:
    """The real processor, counting the pictures it is asked to prepare."""

    def __init__(self, processor):
        self._processor, self.pictures = processor, 0

    def __call__(self, *args, images=None, **kwargs):
        self.pictures += len(images or [])
        return self._processor(*args, images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """Four checkpoint folders of tiny-s with random (non-zero) LoRA weights, marked complete as training does."""
    import torch
    from peft import get_peft_model

    from car_maker_pipeline.training.config import LoraHyperparameters

    root, folders = tmp_path_factory.mktemp("checkpoints"), {}
    for step in (10, 20, 30, 40):
        torch.manual_seed(step)
        config = LoraHyperparameters().to_peft_config()
        config.init_lora_weights = False  # B random too, so each checkpoint answers differently
        peft_model = get_peft_model(copy.deepcopy(tiny_model.model), config)
        with torch.no_grad():
            for name, weight in peft_model.named_parameters():
                if "lora_B" in name:
                    weight.mul_(20.0)
        folders[step] = root / f"checkpoint-{step}"
        peft_model.save_pretrained(folders[step])
        (folders[step] / "trainer_state.json").write_text("{}")
        mark_checkpoint_complete(folders[step], step)
    return folders


def _scored(tiny_model, maker_dataset, checkpoints: dict, out_root):
    processor = CountingProcessor(tiny_model.processor)
    scores = score_checkpoints(
        copy.deepcopy(tiny_model.model),
        processor,
        checkpoints,
        maker_dataset.load(),
        list(maker_dataset.makers),
        out_root,
        baseline_accuracy=None,
        batch_size=8,
    )
    return scores, processor.pictures


def _log_probs(predictions) -> np.ndarray:
    return np.array(predictions.sort_values("index")["log_probs"].tolist())


def test_every_checkpoint_is_scored_on_one_preparation_of_each_picture(
    tiny_model, maker_dataset, checkpoints, tmp_path
):
    data = maker_dataset.load()
    rows = sum(data[split].num_rows for split in SPLITS)
    first = {step: checkpoints[step] for step in (10, 20, 30)}
    scores, prepared = _scored(tiny_model, maker_dataset, first, tmp_path)
    assert prepared == rows, f"{prepared} pictures prepared for 3 checkpoints of {rows} pictures"

    answers = {}
    for step, folder in first.items():  # each checkpoint alone on its own model: the scoring it replaces
        alone = attach_adapter(copy.deepcopy(tiny_model.model), folder).eval()
        classifier = MakerClassifier(alone, tiny_model.processor, list(maker_dataset.makers), batch_size=8)
        for split in SPLITS:
            expected = _log_probs(evaluate_split(classifier, data[split]).predictions)
            got = _log_probs(scores.reports[(step, split)].predictions())
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"step {step} on {split}")
        answers[step] = got
    assert not np.allclose(answers[10], answers[20], atol=1e-3), "the checkpoints must differ for this to test anything"

    written = {
        key: report.predictions_path.stat().st_mtime_ns for key, report in scores.reports.items() if key[0] != "base"
    }
    more, prepared = _scored(tiny_model, maker_dataset, checkpoints, tmp_path)
    assert prepared == rows, "only the new checkpoint is scored, on one preparation of each picture"
    assert {key: more.reports[key].predictions_path.stat().st_mtime_ns for key in written} == written
    assert list(more.table["step"]) == [10, 20, 30, 40]
    _, prepared = _scored(tiny_model, maker_dataset, checkpoints, tmp_path)
    assert prepared == 0


@pytest.mark.parametrize(
    ("cpus", "cuda", "local_processes", "expected"),
    [
        (2, False, 1, 0),
        (64, False, 1, 0),  # no GPU waits for the data: the model's threads take every core
        (16, True, 1, MAX_DATA_WORKERS),
        (4, True, 1, 3),
        (2, True, 1, 1),
        (1, True, 1, 0),
        (16, True, 4, 3),  # four training processes share the cores
        (64, True, 1, MAX_DATA_WORKERS),
    ],
)
def test_data_workers_are_chosen_from_the_machine(cpus, cuda, local_processes, expected):
    assert machine_data_workers(cpus=cpus, cuda=cuda, local_processes=local_processes) == expected


def test_data_workers_reach_the_trainer_and_never_name_the_folder(tmp_path, monkeypatch):
    from car_maker_pipeline.training.config import LoraHyperparameters

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    machine = machine_data_workers()
    for setting, expected in ((None, machine), (0, 0), (3, 3)):
        hyper = LoraHyperparameters(dataloader_num_workers=setting)
        config = hyper.to_sft_config(str(tmp_path), evaluate=False)
        assert (config.dataloader_num_workers, config.dataloader_persistent_workers) == (expected, expected > 0)
    names = {
        (LoraHyperparameters(dataloader_num_workers=w).fingerprint(num_processes=1),
         LoraHyperparameters(dataloader_num_workers=w).legacy_fingerprint(num_processes=1))
        for w in (None, 0)
    }  # fmt: skip
    assert len(names) == 1, "unset and 0 (the earlier default) must name the same folder, old scheme and new"
