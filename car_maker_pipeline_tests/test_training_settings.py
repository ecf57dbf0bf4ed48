"""One hyperparameter schema for the plain functions, the Dagster run config, TRL and PEFT; and the names it
gives training folders, stable across releases (no model is trained here).

| case                                                        | expected                                          |
|-------------------------------------------------------------|---------------------------------------------------|
| `LoraTrainingConfig` against `LoraHyperparameters`          | the same fields plus num_processes and from_sweep |
| TRL's SFTConfig and PEFT's LoraConfig from the settings     | every value carried over                          |
| folder names of earlier releases, 4 settings                | the frozen 10-digit suffixes                      |
| a setting added later, at its default / changed             | same folder / a new one                           |
| a folder started by an earlier release (fields come and go) | resumes; other maths or makers refused, named     |
"""

from __future__ import annotations

import json

import pytest

from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline_tests.support.checkpoints import marked_checkpoint

# The run config's own fields: how to launch, and where the settings come from; neither is a hyperparameter.
RUN_ONLY_FIELDS = {"num_processes", "from_sweep"}


def test_the_run_config_is_the_hyperparameter_schema_plus_the_launch_settings():
    from car_maker_pipeline.orchestration.assets.training import LoraTrainingConfig

    plain, run_config = LoraHyperparameters(), LoraTrainingConfig()
    assert set(LoraTrainingConfig.model_fields) == set(LoraHyperparameters.model_fields) | RUN_ONLY_FIELDS
    assert isinstance(run_config, LoraHyperparameters)
    assert run_config.to_json() == plain.to_json()  # the launch settings are not hyperparameters
    chosen = {"learning_rate": 2e-4, "lora_r": 4, "target_modules": ["q_proj"], "warmup_steps": 0, "bf16": False}
    launched = LoraTrainingConfig(**chosen, num_processes=2, from_sweep=True)
    assert launched.to_json() == LoraHyperparameters(**chosen).to_json()
    assert launched.fingerprint() == LoraHyperparameters(**chosen).fingerprint()


def test_trl_and_peft_settings_come_from_the_hyperparameters(tmp_path):
    hyper = LoraHyperparameters(
        learning_rate=2e-4,
        max_steps=120,
        checkpoint_every_n_steps=30,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        seed=7,
        gradient_checkpointing=True,
        lr_scheduler_type="cosine",
        bf16=False,
    )
    sft = hyper.to_sft_config(str(tmp_path), evaluate=True)
    assert (sft.learning_rate, sft.max_steps, sft.save_steps, sft.eval_steps) == (2e-4, 120, 30, 30)
    assert (sft.per_device_train_batch_size, sft.gradient_accumulation_steps, sft.seed, sft.data_seed) == (4, 8, 7, 7)
    assert sft.gradient_checkpointing and sft.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert sft.lr_scheduler_type == "cosine" and sft.eval_strategy == "steps" and not sft.bf16
    assert sft.completion_only_loss and sft.max_length is None and sft.report_to == []
    assert hyper.to_sft_config(str(tmp_path), evaluate=False).eval_strategy == "no"
    peft = hyper.to_peft_config()
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, set(peft.target_modules)) == (
        16,
        32,
        0.05,
        {"q_proj", "v_proj"},
    )


@pytest.mark.parametrize(
    ("values", "num_processes", "folder_suffix"),
    [  # the names training folders got before the schema was unified: a rerun must find them again
        ({}, 1, "ecd59c2dd8"),
        ({}, 2, "d3648834f4"),
        ({"max_steps": 8, "checkpoint_every_n_steps": 4, "per_device_train_batch_size": 4}, 1, "0d40d998ae"),
        (
            {
                "learning_rate": 1e-3,
                "target_modules": ["q_proj", "v_proj"],
                "vision_lr_scale": 0.1,
                "gradient_checkpointing": True,
                "lora_dropout": 0.05,
                "seed": 3,
            },
            1,
            "86ff2cb255",
        ),
    ],
)
def test_training_folder_names_are_stable_across_releases(values, num_processes, folder_suffix):
    assert LoraHyperparameters(**values).legacy_fingerprint(num_processes=num_processes) == folder_suffix


def test_a_setting_added_later_names_a_new_folder_only_when_changed():
    default = LoraHyperparameters().fingerprint(num_processes=1)
    assert LoraHyperparameters(warmup_steps=5).fingerprint(num_processes=1) == default  # 5 is the default
    changed = {LoraHyperparameters(**v).fingerprint(num_processes=1) for v in ({"warmup_steps": 0}, {"bf16": True})}
    assert default not in changed and len(changed) == 2


def test_a_folder_started_by_an_earlier_release_resumes_and_another_run_is_refused(tmp_path):
    from car_maker_pipeline.training.checkpoints import RUN_SETTINGS_FILE, check_run_settings

    out = tmp_path / "run"
    marked_checkpoint(out, 4)
    earlier = {**LoraHyperparameters().to_json(), "num_train_epochs": 1.0}  # a field that no longer exists
    del earlier["dataloader_num_workers"]  # and one that did not exist yet (compares as its default)
    (out / RUN_SETTINGS_FILE).write_text(json.dumps({"config": earlier, "makers": ["A", "B"], "model": "m"}))

    check_run_settings(out, LoraHyperparameters(), ["A", "B"], "m")
    with pytest.raises(LoraTrainingError, match=r"different settings \(learning_rate, makers\)"):
        check_run_settings(out, LoraHyperparameters(learning_rate=1e-3), ["A", "C"], "m")
