"""LoRA training core: completion-only labels, target-module validation, learning, checkpoints, resume.

The hyperparameter schema and the names of training folders are in test_training_settings.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.checkpoint_marker import CHECKPOINT_MARKER, is_complete_checkpoint
from car_maker_pipeline.training.checkpoints import QUARANTINE_DIR, complete_checkpoints
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.targets import count_adapted_layers
from car_maker_pipeline.training.trainer import build_trainer, train_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_HF_TOKEN = "hf_FAKEtokenTHATmustNEVERbeSAVED0123456789"

# --------------------------------------------------------------------------------------------
# Fixtures: a tiny model and a small 6-maker image task from the synthetic demo source
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The session's tiny-s (conftest), under the name these tests have always used."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(train, validation, makers): `image` + `maker` datasets, also saved to disk for subprocesses."""
    import datasets

    from car_maker_pipeline.data.classes import stanford_cars_class_names
    from car_maker_pipeline.data.makers import maker_of
    from car_maker_pipeline.offline.demo_source import generate_demo_source

    root = tmp_path_factory.mktemp("lora_task")
    source = generate_demo_source(root / "source", train_per_maker=16, test_per_maker=6, corruptions=(), seed=7)
    raw = datasets.load_dataset(str(source))
    names = stanford_cars_class_names()

    def to_makers(split):
        part = raw[split]
        return part.remove_columns(["label"]).add_column("maker", [maker_of(names[i]) for i in part["label"]])

    train, validation = to_makers("train"), to_makers("test")
    train.save_to_disk(str(root / "train"))
    validation.save_to_disk(str(root / "validation"))
    makers = sorted(set(train["maker"]))
    assert len(makers) == 6
    return train, validation, makers, root


# --------------------------------------------------------------------------------------------
# (b) labels: loss only on the answer
# --------------------------------------------------------------------------------------------


def test_labels_cover_only_the_answer_and_end_of_turn(model_dir, task, tmp_path):
    train, validation, makers, _ = task
    trainer, _ = build_trainer(model_dir, train, validation, makers, tmp_path / "run", LoraHyperparameters())
    processor = trainer.processing_class
    tokenizer = processor.tokenizer
    image_id = trainer.model.config.image_token_id
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    rows = [trainer.train_dataset[i] for i in range(6)]
    expected_makers = [row["completion"][0]["content"][0]["text"] for row in rows]
    batch = trainer.data_collator(rows)
    input_ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert "pixel_values" in batch and (input_ids == image_id).any()

    template = PromptTemplate()
    for row in range(len(rows)):
        # The answer as the evaluator sees it: cut from the tokenization of the whole conversation.
        messages = template.messages(makers)
        prompt_ids = tokenizer(
            processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        full_ids = tokenizer(
            processor.apply_chat_template(messages + template.answer_messages(expected_makers[row]), tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        answer_ids = full_ids[len(prompt_ids) :]
        assert answer_ids[: answer_ids.index(end_id) + 1] == (
            tokenizer(expected_makers[row], add_special_tokens=False)["input_ids"] + [end_id]
        )

        trained = labels[row] != -100
        # Every image placeholder, every prompt token and every pad is masked ...
        assert not trained[input_ids[row] == image_id].any()
        assert not trained[attention[row] == 0].any()
        # ... and what is trained is exactly the answer, its <|im_end|> and the template's trailing newline.
        assert labels[row][trained].tolist() == answer_ids
        assert input_ids[row][trained].tolist() == answer_ids
        # The trained tokens come right after the prompt (with its image expanded into placeholders).
        image = trainer.train_dataset[row]["image"]
        prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expanded_prompt = processor(images=[[image]], text=[prompt_text])["input_ids"][0]
        real = input_ids[row][attention[row] == 1].tolist()
        assert real == list(expanded_prompt) + answer_ids
        assert tokenizer.decode(labels[row][trained][:-2]) == expected_makers[row]


# --------------------------------------------------------------------------------------------
# (c) validation before training
# --------------------------------------------------------------------------------------------


def test_unknown_target_module_fails_before_anything_is_written(model_dir, task, tmp_path):
    train, validation, makers, _ = task
    config = LoraHyperparameters(
        target_modules=("q_proj", "o_proj", "gate_proj"), max_steps=2, checkpoint_every_n_steps=2
    )
    with pytest.raises(LoraTrainingError) as error:
        train_lora(model_dir, train, validation, makers, tmp_path / "run", config)
    message = str(error.value)
    assert "o_proj" in message and "gate_proj" in message and "'q_proj'" not in message.split("match no")[0]
    assert "out_proj" in message  # the layer names that do exist are listed
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / "run").exists()


def test_maker_outside_the_list_is_rejected(model_dir, task, tmp_path):
    train, validation, makers, _ = task
    with pytest.raises(LoraTrainingError, match="not in the answer list"):
        train_lora(
            model_dir,
            train,
            validation,
            makers[:5],
            tmp_path / "run",
            LoraHyperparameters(max_steps=2, checkpoint_every_n_steps=2),
        )


def test_default_targets_follow_liquids_recipe_and_vision_lr_is_scaled(model_dir, task, tmp_path):
    train, validation, makers, _ = task
    config = LoraHyperparameters(vision_lr_scale=0.1, learning_rate=1e-3)
    trainer, matched = build_trainer(model_dir, train, validation, makers, tmp_path / "run", config)
    # out_proj hits the attention output projections and the LM's short-conv output projection.
    assert any(name.endswith("conv.out_proj") for name in matched["out_proj"])
    assert any(".vision_tower." in name for name in matched["out_proj"])
    assert all(name.endswith("conv.in_proj") for name in matched["in_proj"])
    assert not any("feed_forward" in name for names in matched.values() for name in names)
    counts, names = count_adapted_layers(trainer.model)
    # tiny-s: 2 vision layers x (q,k,v,out,fc1,fc2); projector 2; LM 3 attention x 4 + 1 conv x 2
    assert counts == {"vision_tower": 12, "projector": 2, "language_model": 14}
    assert len(names) == sum(len(v) for v in matched.values())

    optimizer = trainer.create_optimizer()
    by_lr: dict[float, int] = {}
    for group in optimizer.param_groups:
        lr = round(group["lr"], 12)
        by_lr[lr] = by_lr.get(lr, 0) + sum(p.numel() for p in group["params"])
    vision = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and ".vision_tower." in n)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert by_lr == {1e-4: vision, 1e-3: trainable - vision}


# --------------------------------------------------------------------------------------------
# (a) it learns; checkpoints every N steps; nothing secret is saved
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_validation_loss_and_checkpoints_every_n_steps(model_dir, task, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    train, validation, makers, _ = task

    class Recorder(TrainerCallback):
        def __init__(self):
            self.saves, self.evals = [], []

        def on_save(self, args, state, control, **kwargs):
            self.saves.append(state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evals.append((state.global_step, metrics["eval_loss"]))

    recorder = Recorder()
    config = LoraHyperparameters(max_steps=80, checkpoint_every_n_steps=20, per_device_train_batch_size=16)
    result = train_lora(model_dir, train, validation, makers, tmp_path / "run", config, callbacks=[recorder])

    assert result.global_step == 80
    assert sorted(result.checkpoints) == [20, 40, 60, 80] == recorder.saves
    assert [step for step, _ in result.val_loss] == [20, 40, 60, 80] == [step for step, _ in recorder.evals]
    first_train_loss = result.train_loss[0][1]
    assert result.val_loss[-1][1] < 0.25 * first_train_loss  # ~8.7 (random) -> well under 2
    assert result.val_loss[-1][1] < result.val_loss[0][1]
    assert result.adapted_layers == {"vision_tower": 12, "projector": 2, "language_model": 14}
    assert result.final_checkpoint == result.checkpoints[80]

    for step, path in result.checkpoints.items():
        assert is_complete_checkpoint(path)
        for name in (
            "adapter_model.safetensors",
            "adapter_config.json",
            "processor_config.json",
            "tokenizer.json",
            "chat_template.jinja",
            "trainer_state.json",
            CHECKPOINT_MARKER,
        ):
            assert (path / name).is_file(), (step, name)
        assert not list(path.glob("*.bin")) or [p.name for p in path.glob("*.bin")] == ["training_args.bin"]
    # The adapter and processor load back like any PEFT checkpoint.
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    PeftModel.from_pretrained(base, result.final_checkpoint)
    AutoProcessor.from_pretrained(result.final_checkpoint)

    for file in (tmp_path / "run").rglob("*"):
        if file.is_file():
            assert FAKE_HF_TOKEN.encode() not in file.read_bytes(), file

    # Called again on a finished run: nothing is retrained, the same result comes back.
    again = train_lora(model_dir, train, validation, makers, tmp_path / "run", config)
    assert again.global_step == 80 and again.val_loss == result.val_loss


# --------------------------------------------------------------------------------------------
# (d) SIGKILL and resume
# --------------------------------------------------------------------------------------------

_RUNNER = textwrap.dedent(
    """
    import json, os, sys, time
    import datasets
    from transformers import TrainerCallback
    from car_maker_pipeline.training.config import LoraHyperparameters
    from car_maker_pipeline.training.trainer import train_lora

    model_dir, data_dir, out_dir, max_steps, every = sys.argv[1:6]
    delay = float(os.environ.get("STEP_DELAY_S", "0"))

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(delay)

    train = datasets.load_from_disk(os.path.join(data_dir, "train"))
    validation = datasets.load_from_disk(os.path.join(data_dir, "validation"))
    makers = sorted(set(train["maker"]))
    config = LoraHyperparameters(max_steps=int(max_steps), checkpoint_every_n_steps=int(every), logging_steps=1,
                                per_device_train_batch_size=8)
    result = train_lora(model_dir, train, validation, makers, out_dir, config, callbacks=[Slow()] if delay else None)
    print("RESULT " + json.dumps(result.to_json()), flush=True)
    """
)


def _run(args, env_extra=None, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", _RUNNER, *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _result_of(process, timeout=180):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    line = [line for line in output.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _adapter_size(checkpoint: Path) -> int:
    return (checkpoint / "adapter_model.safetensors").stat().st_size


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_ignores_a_half_written_checkpoint(model_dir, task, tmp_path):
    _, _, _, data_dir = task
    max_steps, every = 12, 4

    # Uninterrupted reference run, beside the interrupted one (which mostly sleeps) rather than before it.
    reference_run = _run([model_dir, data_dir, tmp_path / "reference", max_steps, every])

    # Interrupted run: slowed down so it is certainly mid-training when the first checkpoint lands.
    out = tmp_path / "interrupted"
    process = _run([model_dir, data_dir, out, max_steps, every], env_extra={"STEP_DELAY_S": "1.0"})
    deadline = time.monotonic() + 150
    while not (out / f"checkpoint-{every}" / CHECKPOINT_MARKER).exists():
        assert process.poll() is None, process.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    done = complete_checkpoints(out)
    assert every in done and max(done) < max_steps

    # A crash in the middle of the next save: the folder exists, the adapter is there, the state is not.
    newest = max(done)
    half = out / f"checkpoint-{newest + every}"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes((done[newest] / "adapter_model.safetensors").read_bytes()[:100])
    (half / "adapter_config.json").write_text((done[newest] / "adapter_config.json").read_text())
    # And a newest checkpoint whose marker exists but whose adapter was truncated afterwards.
    truncated = out / f"checkpoint-{newest + 2 * every}"
    if newest + 2 * every < max_steps:
        truncated.mkdir()
        for file in done[newest].iterdir():
            (truncated / file.name).write_bytes(file.read_bytes())
        with open(truncated / "adapter_model.safetensors", "r+b") as handle:
            handle.truncate(50)
    assert not is_complete_checkpoint(half)
    assert not is_complete_checkpoint(truncated)

    reference = _result_of(reference_run)
    resumed = _result_of(_run([model_dir, data_dir, out, max_steps, every]))
    assert resumed["global_step"] == reference["global_step"] == max_steps
    assert resumed["resumed_from"] == str(done[newest])
    assert sorted(map(int, resumed["checkpoints"])) == list(range(every, max_steps + 1, every))
    moved = sorted(p.name for p in (out / QUARANTINE_DIR).iterdir())
    assert any(name.startswith(half.name + "-") for name in moved)
    why = {q["step"]: q["problems"] for q in resumed["quarantined"]}
    assert why[newest + every] == ["no completion marker: the save was interrupted, or this pipeline did not write it"]
    if newest + 2 * every < max_steps:  # the truncated copy was made
        assert why[newest + 2 * every] == [
            f"adapter_model.safetensors has 50 bytes; {_adapter_size(done[newest])} were written"
        ]

    # Resuming restored optimizer, scheduler, RNG and data order: the adapters match the uninterrupted run's.
    final_resumed = _adapter(resumed["final_checkpoint"])
    final_reference = _adapter(reference["final_checkpoint"])
    assert final_resumed.keys() == final_reference.keys()
    for key in final_reference:
        torch.testing.assert_close(final_resumed[key], final_reference[key], atol=1e-4, rtol=1e-3)
    losses = lambda result: {step: loss for step, loss in result["val_loss"]}  # noqa: E731
    assert losses(resumed)[max_steps] == pytest.approx(losses(reference)[max_steps], rel=1e-3)
