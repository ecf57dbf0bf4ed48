"""The training hyperparameters: one schema for the plain functions, the Dagster run config, TRL and PEFT.

`LoraHyperparameters` owns every hyperparameter, its range and its default. The plain functions
take it, the `lora_checkpoints` asset's run config is a subclass of it (adding only how many
processes to launch), and `to_sft_config()` / `to_peft_config()` are the one mapping into TRL's
`SFTConfig` and PEFT's `LoraConfig`. Bad values are rejected when the object is built, which for a
Dagster run is when it reads its config, before any data or model is touched.

This module is imported when Dagster loads the pipeline's definitions, so it imports only pydantic
at the top: torch, TRL and PEFT (about 5 s to import) are imported by the two conversion methods,
which only run inside a training step.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
from car_maker_pipeline.training.legacy_names import legacy_fingerprint

LENGTH_COLUMN = "length"  # image tokens per training picture, for the length-grouped sampler

# Liquid's own VLM recipe (leap-finetune `LFM2_VLM_LORA_CONFIG`); targets.py says what they adapt.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "in_proj",
    "fc1",
    "fc2",
    "linear_1",
    "linear_2",
)

# Settings that do not change what the optimizer computes: how data is loaded, how validation is
# batched, how often the loss is logged, how many checkpoints are kept. Changing one never forks the
# training folder (nor is it compared when a folder is resumed). Add a field here when it is
# introduced, if it is of that kind.
NON_MATHEMATICAL_FIELDS = frozenset(
    {"dataloader_num_workers", "per_device_eval_batch_size", "logging_steps", "save_total_limit"}
)
# Settings that decide where a run ends, not what any step computes: a run of otherwise equal settings
# is continued, shortened or stopped in the same folder (continuation.py, early_stopping.py).
RUN_LENGTH_FIELDS = frozenset({"max_steps", "early_stopping_patience", "early_stopping_min_delta", "fresh_start"})

# Schedules whose learning rate at a step does not depend on the run's length, or (warmup-stable-decay)
# does not until the decay begins: a run of them can be extended soundly (continuation.py).
EXTENDABLE_SCHEDULES = ("warmup_stable_decay", "constant", "constant_with_warmup", "inverse_sqrt")


class LoraTrainingError(ValueError):
    """A LoRA training request that cannot be run as given; the message says what to change."""


class LoraHyperparameters(BaseModel):
    """Hyperparameters of one LoRA run. Defaults are tuned for the tiny demo models on a CPU.

    With these defaults tiny-s goes from chance (1/6) to ~90% test accuracy on the 6-maker synthetic
    demo task by step 200 and ~96% by step 350-400 (batch 32, about 100 s on 2 CPU cores), with every
    maker equally represented; at the demo's default real proportions set `sampling="balanced"`,
    or the rarest makers stay unlearnt (bench/README.md, bench_balancing). Batch
    size matters more than steps for the tiny models: at batch 8 the image signal drowns in
    gradient noise (600 steps of batch 8 stayed near 50%). For the real LFM2-VL models use a lower
    `learning_rate` (about 2e-4), `vision_lr_scale=0.1` (Liquid's recipe), a batch that fits the
    GPU (with `gradient_accumulation_steps`) and `max_steps` sized to the data.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    learning_rate: float = Field(default=5e-3, gt=0, description="Peak learning rate (after warm-up).")
    max_steps: int = Field(
        default=400,
        gt=0,
        description="Optimizer steps. Raising it on a finished run of otherwise equal settings continues that run "
        "(warmup_stable_decay, constant schedules); lowering it uses its checkpoints up to that step.",
    )
    per_device_train_batch_size: int = Field(default=32, gt=0, description="Images per step and process.")
    per_device_eval_batch_size: int = Field(default=32, gt=0, description="Images per validation forward pass.")
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    lora_r: int = Field(default=8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(default=16, gt=0, description="LoRA scaling numerator (the update is scaled by alpha/r).")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default=list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Module-name suffixes to adapt (Liquid's LFM2-VL recipe by default). "
        "One that matches nothing is an error.",
    )
    checkpoint_every_n_steps: int = Field(
        default=50, gt=0, description="Save a checkpoint and compute validation loss every N steps."
    )
    seed: int = Field(default=0, ge=0, description="Seeds the adapter's initialisation, dropout and data order.")
    vision_lr_scale: float = Field(
        default=1.0, ge=0, description="Learning-rate multiplier for the vision tower's LoRA weights (Liquid: 0.1)."
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations: less memory, slower.")
    warmup_steps: int = Field(default=5, ge=0)
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "warmup_stable_decay",
    ] = Field(
        default="linear",
        description="transformers' schedule. warmup_stable_decay (warm-up, constant, then a cosine decay over the "
        "last `decay_fraction` of the steps) is the one for runs that may be extended: a continued run resumes "
        "from its last checkpoint before the decay and ends equal to an uninterrupted run of the new length. "
        "linear (the default) and cosine decay to zero over max_steps and cannot be extended.",
    )
    decay_fraction: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="warmup_stable_decay only: the share of max_steps spent decaying (rounded to whole steps).",
    )
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    logging_steps: int = Field(default=10, gt=0, description="Log the training loss every N steps.")
    save_total_limit: int | None = Field(
        default=None, gt=0, description="Keep only the newest N checkpoints (default: all, so every one is scored)."
    )
    bf16: bool | None = Field(
        default=None, description="bf16 mixed precision; unset: on a CUDA GPU that supports it, fp32 otherwise."
    )
    dataloader_num_workers: int | None = Field(
        default=None,
        ge=0,
        description="Processes decoding and preparing batches ahead of the model (torch's DataLoader); unset: "
        "chosen from the machine (`machine_data_workers`). Changes no maths, so never the training folder.",
    )
    # The image-token budget (the processor's own settings; unset keeps the model's). Recorded with the
    # run, so its checkpoints are evaluated with the budget they were trained with.
    min_image_tokens: int | None = Field(default=None, gt=0, description="Fewest image tokens per picture.")
    max_image_tokens: int | None = Field(default=None, gt=0, description="Most image tokens per tile.")
    do_image_splitting: bool | None = Field(default=None, description="Tile large pictures (+ a thumbnail).")
    group_by_image_tokens: bool = Field(
        default=False,
        description="Draw batches of pictures with similar image-token counts (transformers' length-grouped "
        "sampler), so a batch of mixed photo sizes does not pad every row to the largest. Worth it on real "
        "photos; the demo's pictures are all one size. Combines with sampling='balanced' (the balanced draws "
        "are grouped).",
    )
    sampling: Literal["natural", "balanced"] = Field(
        default="natural",
        description="How training rows are drawn. natural: every row once per epoch, so makers come in their "
        "data proportions. balanced: each maker present in the training split is equally likely per draw "
        "(rows drawn with replacement, weight 1/count(maker)), so a maker with a tenth of the images is seen "
        "as often as the others; an epoch still has one draw per row. Seeded by `seed` and the epoch. "
        "Recommended when makers are unbalanced (bench/README.md, bench_balancing: far better rare makers, "
        "same overall accuracy); natural stays the default so existing training folders keep their meaning.",
    )
    augmentation: bool = Field(
        default=False,
        strict=True,
        description="Light random changes to each training picture as it is read: a crop of 80-100% of the "
        "area (aspect within 10%) resized back to the picture's size, a horizontal flip, brightness, contrast "
        "and saturation within 20% (hue is kept: body colour can tell makers apart). Validation pictures "
        "and the stored dataset are never changed; `seed` fixes every change, so a rerun sees the same pictures. "
        "Off by default: in bench_balancing (tiny-s, 160 steps) it lowered macro accuracy with natural sampling "
        "and changed nothing beyond seed noise with balanced sampling (bench/README.md).",
    )

    early_stopping_patience: int | None = Field(
        default=None,
        gt=0,
        description="Stop after this many checkpoints without a gain of at least early_stopping_min_delta in "
        "validation accuracy (the constrained classifier's, scored at every checkpoint). Unset: train to max_steps.",
    )
    early_stopping_min_delta: float = Field(
        default=0.0, ge=0, lt=1, description="The least gain in validation accuracy that counts as progress."
    )
    fresh_start: bool = Field(
        default=False,
        description="Train from step 0 in a folder of its own (named with max_steps too) instead of continuing "
        "or shortening a run of otherwise equal settings: for a longer run of a schedule that cannot be extended.",
    )

    @model_validator(mode="after")
    def _checkpoints_fit_in_the_run(self):
        if self.checkpoint_every_n_steps > self.max_steps:
            raise ValueError(
                f"checkpoint_every_n_steps ({self.checkpoint_every_n_steps}) is larger than max_steps "
                f"({self.max_steps}): no intermediate checkpoint would be written. Lower it or train longer."
            )
        self.image_token_budget()  # ImageTokenBudgetError (a ValueError) when min > max
        if any(not name.strip() for name in self.target_modules):
            raise ValueError(f"target_modules holds an empty module name ({self.target_modules}); remove it.")
        return self

    def to_json(self) -> dict[str, Any]:
        """The hyperparameters alone (a subclass's own fields, such as a launch setting, are left out)."""
        return self.model_dump(mode="json", include=set(LoraHyperparameters.model_fields))

    def maths(self) -> dict[str, Any]:
        """The settings that decide what each optimizer step computes: everything but the non-mathematical
        settings and those that only decide where the run ends (its length, early stopping)."""
        values = {
            name: value
            for name, value in self.to_json().items()
            if name not in NON_MATHEMATICAL_FIELDS and name not in RUN_LENGTH_FIELDS
        }
        if self.lr_scheduler_type != "warmup_stable_decay":
            values.pop("decay_fraction")  # read by that schedule alone
        return values

    def fingerprint(self, **launch_settings: Any) -> str:
        """Ten hex digits naming the maths of these hyperparameters (plus `launch_settings`).

        A setting at its default is left out of the hash, so adding a setting to the schema keeps every
        folder's name; a non-mathematical setting or the run's length never enters it.
        """
        defaults = LoraHyperparameters().to_json()
        values = {name: value for name, value in self.maths().items() if value != defaults[name]}
        payload = {"maths": values, **launch_settings}
        if self.fresh_start:  # a run of its own length, in a folder of its own
            payload["max_steps"] = self.max_steps
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    def legacy_fingerprint(self, **launch_settings: Any) -> str:
        """The name earlier releases gave a training folder (legacy_names.py), so one they made resumes."""
        return legacy_fingerprint(self.to_json(), LoraHyperparameters().to_json(), **launch_settings)

    def same_maths(self, other: LoraHyperparameters) -> list[str]:
        """The mathematical settings in which `other` differs from these (empty: the same run)."""
        mine, theirs = self.maths(), other.maths()
        return sorted(name for name in mine if mine[name] != theirs.get(name))

    def decay_steps(self, max_steps: int | None = None) -> int:
        """warmup_stable_decay: the steps of the decay for a run of `max_steps` (default: this run's)."""
        steps = self.max_steps if max_steps is None else max_steps
        return min(steps, max(1, round(steps * self.decay_fraction)))

    def scheduler_kwargs(self, max_steps: int | None = None) -> dict[str, Any]:
        """transformers' `lr_scheduler_kwargs` for a run of `max_steps` (default: this run's)."""
        if self.lr_scheduler_type == "warmup_stable_decay":
            return {"num_decay_steps": self.decay_steps(max_steps)}
        return {}

    def length_independent_steps(self, max_steps: int | None = None) -> int:
        """How many leading optimizer steps of a run of `max_steps` use a learning rate that does not depend on
        `max_steps`: a checkpoint at or before that step is also a checkpoint of a run of any other length
        with the same property (continuation.py). The whole run for constant schedules, up to the decay for
        warmup_stable_decay, only the warm-up for the schedules that decay over the whole run."""
        steps = self.max_steps if max_steps is None else max_steps
        if self.lr_scheduler_type == "warmup_stable_decay":
            return steps - self.decay_steps(steps)
        if self.lr_scheduler_type in EXTENDABLE_SCHEDULES:
            return steps
        return min(self.warmup_steps, steps)

    def image_token_budget(self) -> ImageTokenBudget:
        return ImageTokenBudget(self.min_image_tokens, self.max_image_tokens, self.do_image_splitting)

    def data_workers(self) -> int:
        """The DataLoader workers this run uses: the setting, or `machine_data_workers()` when unset."""
        from car_maker_pipeline.machine import machine_data_workers

        return self.dataloader_num_workers if self.dataloader_num_workers is not None else machine_data_workers()

    def use_bf16(self) -> bool:
        import torch

        if self.bf16 is not None:
            return self.bf16
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    def to_sft_config(self, output_dir: str, *, evaluate: bool):
        """TRL's `SFTConfig` for a run writing to `output_dir`; `evaluate`: a validation set is given."""
        import torch
        from trl import SFTConfig

        workers = self.data_workers()
        return SFTConfig(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if self.gradient_checkpointing else None,
            warmup_steps=self.warmup_steps,
            lr_scheduler_type=self.lr_scheduler_type,
            lr_scheduler_kwargs=self.scheduler_kwargs(),
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            data_seed=self.seed,
            bf16=self.use_bf16(),
            fp16=False,
            logging_steps=self.logging_steps,
            logging_first_step=True,
            save_strategy="steps",
            save_steps=self.checkpoint_every_n_steps,
            save_total_limit=self.save_total_limit,
            train_sampling_strategy="group_by_length" if self.group_by_image_tokens else "random",
            length_column_name=LENGTH_COLUMN,
            save_only_model=False,  # optimizer, scheduler and RNG state too: resuming continues the same run
            eval_strategy="steps" if evaluate else "no",
            eval_steps=self.checkpoint_every_n_steps,
            prediction_loss_only=True,  # never gather full-vocabulary logits of the validation set
            max_length=None,  # never truncate: a cut prompt loses image tokens, a cut answer trains nothing
            completion_only_loss=True,
            assistant_only_loss=False,
            packing=False,
            remove_unused_columns=False,  # the collator needs the `image` column
            dataset_kwargs={"skip_prepare_dataset": True},
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,  # forked once per run, not at every epoch and evaluation
            ddp_find_unused_parameters=False,  # under DDP every LoRA weight takes part in every forward pass
            report_to="none",  # our own MLflow callback logs to the pipeline's run (see mlflow_callback.py)
            push_to_hub=False,
            hub_token=None,
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )

    def to_peft_config(self):
        """PEFT's `LoraConfig` for these hyperparameters."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
