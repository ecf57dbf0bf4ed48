"""Where the time goes: every checkpoint scored on one pass over the pictures; data workers from the machine.

| case                                                         | expected                                                   |
|--------------------------------------------------------------|------------------------------------------------------------|
| 3 checkpoints (random LoRA weights) scored by `score_checkpoints` | every maker's log-probability per image equals each checkpoint scored alone on its own model, to 1e-5; the checkpoints differ |
| processor calls while scoring 3 checkpoints                  | each validation and test picture prepared once (not 3 times) |
| a 4th checkpoint added, scored again with 2 preparing threads | only it is scored (one preparation per picture); the cached results are not rewritten |
| all scored, asked again                                      | no picture prepared at all                                  |
| `prefetched`: 0-3 threads, depth 1-3, jobs of random durations | results in input order; never more than depth results waiting; jobs read only as far as the look-ahead |
| `prefetched`: a job fails                                    | its error raised at its turn, after the results before it   |
| `evaluate_split` with 2 preparing threads vs none            | the same log-probabilities (1e-5); each batch's processor never shared by two threads |
| draft size for random photo sizes, tiny and real processors | None, or a 1/2-1/8 size with the same tiles, resized size and image tokens, every target no larger than it |
| a stored 5,616 x 3,744 JPEG opened for the real processor / a 3,000 x 2,000 JPEG (its tiles need every pixel) | decoded at the draft size / at full size |
| data workers: no GPU (any cores) / GPU with 16, 4, 2, 1 cores / 16 cores shared by 4 processes / 64 cores | 0 / 8 (capped), 3, 1, 0 / 3 / 8 |
| a process importing the package, OMP_WAIT_POLICY unset / ACTIVE | PASSIVE / ACTIVE (the user's wins), set before torch is loaded |
| training config with workers unset, 0 or 3                   | SFTConfig gets the machine's choice, 0, 3 (persistent workers when > 0); one folder name for all, old and new |
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

from car_maker_pipeline.evaluation.checkpoint_scores import score_checkpoints
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
from car_maker_pipeline.machine import MAX_DATA_WORKERS, machine_data_workers
from car_maker_pipeline.models.checkpoint_marker import mark_checkpoint_complete
from car_maker_pipeline.models.loading import attach_adapter

SPLITS = ("validation", "test")


class CountingProcessor:
    """The real processor, counting the pictures it is asked to prepare (its copies, made for preparing
    threads, count into the same tally)."""

    def __init__(self, processor, tally: list | None = None):
        self._processor, self._tally = processor, tally if tally is not None else [0]

    @property
    def pictures(self) -> int:
        return self._tally[0]

    def __call__(self, *args, images=None, **kwargs):
        self._tally[0] += len(images or [])
        return self._processor(*args, images=images, **kwargs)

    def __deepcopy__(self, memo):
        return CountingProcessor(copy.deepcopy(self._processor, memo), self._tally)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
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


def _scored(tiny_model, maker_dataset, checkpoints: dict, out_root, prepare_workers: int = 0):
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
        prepare_workers=prepare_workers,
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
    more, prepared = _scored(tiny_model, maker_dataset, checkpoints, tmp_path, prepare_workers=2)
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


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_pipeline_processes_let_compute_threads_sleep_unless_told_otherwise(given, expected):
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    probe = "import os, sys, car_maker_pipeline; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [expected, "False"], "set before torch loads, so its OpenMP runtime reads it"


@pytest.mark.parametrize(("workers", "depth"), [(0, 2), (1, 1), (2, 2), (3, 1), (3, 3)])
def test_prefetched_keeps_order_and_bounds_what_waits(workers, depth):
    import random
    import threading
    import time

    from car_maker_pipeline.evaluation.scoring.inputs import prefetched

    lock, state = threading.Lock(), {"read": 0, "done": 0, "consumed": 0, "most_waiting": 0, "most_read_ahead": 0}
    rng = random.Random(workers * 10 + depth)
    delays = [rng.uniform(0, 0.004) for _ in range(25)]

    def jobs():
        for job in range(len(delays)):
            with lock:
                state["read"] += 1
                state["most_read_ahead"] = max(state["most_read_ahead"], state["read"] - state["consumed"])
            yield job

    def prepare(job):
        time.sleep(delays[job])
        with lock:
            state["done"] += 1
            state["most_waiting"] = max(state["most_waiting"], state["done"] - state["consumed"])
        return job * job

    results = []
    for result in prefetched(jobs(), prepare, workers, depth):
        results.append(result)
        time.sleep(0.002)  # the model's turn
        with lock:
            state["consumed"] += 1
    assert results == [job * job for job in range(len(delays))]
    bound = 1 if workers == 0 else depth + 1  # the result in use and those prepared ahead
    assert state["most_waiting"] <= bound and state["most_read_ahead"] <= bound, state


def test_prefetched_raises_a_failed_job_at_its_turn():
    from car_maker_pipeline.evaluation.scoring.inputs import prefetched

    def prepare(job):
        if job == 2:
            raise ValueError("picture 2 cannot be decoded")
        return job

    results = prefetched(range(6), prepare, workers=2, depth=2)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="picture 2"):
        next(results)


class OneThreadAtATime:
    """The real processor, failing when two threads call this very object at once."""

    threads: set = set()  # every thread that called any copy

    def __init__(self, processor):
        self._processor, self._inside = processor, 0

    def __call__(self, *args, **kwargs):
        import threading
        import time

        self._inside += 1
        try:
            assert self._inside == 1, "one processor used by two threads at once"
            OneThreadAtATime.threads.add(threading.current_thread().name)
            time.sleep(0.005)  # widen the window another thread would need to collide
            return self._processor(*args, **kwargs)
        finally:
            self._inside -= 1

    def __getattr__(self, name):
        if name.startswith("_"):  # copy.deepcopy looks for hooks before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(self._processor, name)


def test_batches_prepared_in_threads_score_as_in_one(tiny_model, maker_dataset):
    test = maker_dataset.load()["test"]
    makers = list(maker_dataset.makers)
    alone = evaluate_split(
        MakerClassifier(tiny_model.model, tiny_model.processor, makers, batch_size=4, workers=0), test
    )
    OneThreadAtATime.threads = set()
    guarded = OneThreadAtATime(tiny_model.processor)
    threaded = MakerClassifier(tiny_model.model, guarded, makers, batch_size=4, workers=2, prefetch=2)
    run = evaluate_split(threaded, test)
    np.testing.assert_allclose(_log_probs(run.predictions), _log_probs(alone.predictions), atol=1e-5)
    assert len(OneThreadAtATime.threads) == 2, OneThreadAtATime.threads
    assert all(name.startswith("prepare-batch") for name in OneThreadAtATime.threads)


def _image_processor(kind: str, tiny_model):
    """The demo models' image processor (the session's tiny model's) or LFM2-VL's real one."""
    from transformers import Lfm2VlImageProcessor

    return tiny_model.processor.image_processor if kind == "tiny" else Lfm2VlImageProcessor()


@pytest.mark.parametrize("kind", ["tiny", "real"])
def test_a_draft_size_changes_nothing_the_processor_decides(kind, tiny_model):
    from car_maker_pipeline.model_inputs.image_tokens import draft_size, image_token_count, processor_layout

    processor = _image_processor(kind, tiny_model)
    rng = np.random.default_rng(11)
    sizes = [(5616, 3744), (1600, 1200), (640, 480), (128, 96), (4000, 600)]
    sizes += [(int(w), int(h)) for w, h in rng.integers(48, 6000, size=(200, 2))]
    drafted = 0
    for width, height in sizes:
        reduced = draft_size(processor, width, height)
        if reduced is None:
            continue
        drafted += 1
        assert any(reduced == (-(-width // s), -(-height // s)) for s in (2, 4, 8)), (width, height, reduced)
        assert processor_layout(processor, *reduced) == processor_layout(processor, width, height)
        assert image_token_count(processor, *reduced) == image_token_count(processor, width, height)
        grid, resized, _ = processor_layout(processor, width, height)
        assert resized[0] <= reduced[0] and resized[1] <= reduced[1], "the processor would upscale the draft"
    assert drafted > 20, "large photos must be drafted, or the test checks nothing"
    assert draft_size(processor, 128, 96) is None or kind == "tiny"


@pytest.mark.parametrize(
    ("size", "kind", "drafted"),
    [((5616, 3744), "JPEG", True), ((3000, 2000), "JPEG", False)],
)
def test_a_stored_jpeg_is_decoded_at_the_draft_size(size, kind, drafted):
    import io

    from PIL import Image

    from car_maker_pipeline.evaluation.scoring.inputs import StoredPicture, opened
    from car_maker_pipeline.model_inputs.image_tokens import draft_size

    processor = _image_processor("real", None)
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buffer, format=kind)
    stored = StoredPicture.of({"bytes": buffer.getvalue(), "path": None})
    full, reduced = opened(stored), opened(stored, processor)
    expected = draft_size(processor, *size) if drafted else size  # 3000 x 2000: its tiles need every pixel
    assert expected is not None and reduced.size == expected and full.size == size
    shapes = [
        processor(images=[[p.convert("RGB")]], return_tensors="pt")["pixel_values"].shape for p in (full, reduced)
    ]
    assert shapes[0] == shapes[1]
