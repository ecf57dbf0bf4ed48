"""LoRA fine-tuning of an LFM2-VL model into a car-maker classifier: plain functions, no Dagster.

    result = train_lora(model_dir, train_ds, val_ds, makers, output_dir, LoraHyperparameters())

The datasets have an `image` column (PIL images) and a `maker` column (str); sft_data.py turns them
into TRL prompt/completion examples with the loss on the answer only. `build_trainer` checks the
target modules (targets.py) and the data before it creates anything, then builds TRL's `SFTTrainer`
with PEFT LoRA from the hyperparameters (config.py). `train_lora` trains, checkpointing every
`checkpoint_every_n_steps` steps and resuming from the newest checkpoint of `output_dir` that passes
verification (checkpoints.py). With `sampling="balanced"` or `augmentation=True` the trainer draws
its training rows itself (sampling.py) and reads their pictures changed (augmentation.py), both
fixed by the seed and the epoch, so a resumed run still ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trl import SFTTrainer

from car_maker_pipeline.data.tasks import MAKER, Task
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.loading import load_model_and_processor
from car_maker_pipeline.training.augmentation import AugmentedRows
from car_maker_pipeline.training.checkpoints import CheckpointCompletionCallback, check_run_settings, resume_point
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.continuation import ScheduleSaves, decay_start, move_superseded, plan_run
from car_maker_pipeline.training.early_stopping import CheckpointValidation, EarlyStopping, Listener, read_scores
from car_maker_pipeline.training.result import LoraTrainingResult, build_result
from car_maker_pipeline.training.sampling import TrainDraws, trainer_draws
from car_maker_pipeline.training.sft_data import build_sft_dataset
from car_maker_pipeline.training.targets import component_of, count_adapted_layers, match_target_modules

__all__ = ["LoraSFTTrainer", "LoraTrainingResult", "build_trainer", "load_base_model", "train_lora"]

logger = logging.getLogger(__name__)


class LoraSFTTrainer(SFTTrainer):
    """SFTTrainer with a lower learning rate for the vision tower's LoRA weights, if asked, and its own train order.

    `sampling="balanced"` draws the training rows maker-balanced and `augmentation=True` reads their
    pictures changed (sampling.py, augmentation.py); both need `train_makers`, the maker of every
    training row. With neither, batches come from transformers' own sampler, exactly as before
    these options existed, so a run started then resumes with the same data order.
    """

    def __init__(
        self,
        *args,
        vision_lr_scale: float = 1.0,
        sampling: str = "natural",
        augmentation: bool = False,
        train_makers: Sequence[str] | None = None,
        **kwargs,
    ):
        self.vision_lr_scale = vision_lr_scale
        self.sampling, self.augmentation = sampling, augmentation
        self.train_makers = list(train_makers) if train_makers is not None else None
        self.train_draws: TrainDraws | None = None  # the sampler of the newest training dataloader, if ours
        super().__init__(*args, **kwargs)
        if self._draws_its_own_order() and self.train_makers is None:
            raise LoraTrainingError(
                f"sampling={sampling!r} with augmentation={augmentation} needs train_makers, the maker of every "
                "training row; build the trainer with build_trainer, which passes them."
            )

    def _draws_its_own_order(self) -> bool:
        return self.sampling == "balanced" or self.augmentation

    def _get_train_sampler(self, train_dataset=None):
        if not self._draws_its_own_order():
            return super()._get_train_sampler(train_dataset)
        balanced, keyed = self.sampling == "balanced", self.augmentation
        self.train_draws = trainer_draws(
            self.args, self.train_dataset, self.train_makers, balanced=balanced, keyed=keyed
        )
        return self.train_draws

    def get_train_dataloader(self):
        if not self.augmentation:
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return self._get_dataloader(
            dataset=AugmentedRows(self.train_dataset, seed),
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _run_epoch(self, *args, epoch: int, **kwargs):
        # accelerate passes the Trainer's set_epoch on to the sampler, except through the skip wrapper of
        # a resumed epoch over a multi-process batch sampler: tell ours directly, so resuming is exact.
        if self.train_draws is not None:
            self.train_draws.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.vision_lr_scale == 1.0:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((component_of(name) == "vision_tower", name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if decayed else 0.0,
                "lr": self.args.learning_rate * (self.vision_lr_scale if vision else 1.0),
            }
            # A fixed order: the optimizer state of a resumed run is matched to its groups by position.
            for (vision, decayed), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


def load_base_model(model_dir: str | os.PathLike, hyperparameters: LoraHyperparameters):
    """The base model and processor, in fp32 (or bf16 weights when training in bf16 on a GPU).

    Through the pipeline's one loader: safetensors only, never remote code, image token checked.
    """
    dtype = "bfloat16" if hyperparameters.use_bf16() else "float32"
    loaded = load_model_and_processor(str(model_dir), device="cpu", dtype=dtype)
    hyperparameters.image_token_budget().apply(loaded.processor)  # the budget it trains (and is scored) with
    return loaded.model.train(), loaded.processor


def build_trainer(
    model_dir: str | os.PathLike,
    train_dataset,
    eval_dataset,
    makers: Sequence[str],
    output_dir: str | os.PathLike,
    hyperparameters: LoraHyperparameters = LoraHyperparameters(),
    callbacks: Sequence[Any] | None = None,
    prompt: PromptTemplate | None = None,
    model=None,
    processor=None,
    task: Task = MAKER,
):
    """Check the target modules and the data, then build the TRL `SFTTrainer` (with PEFT LoRA) for one run.

    The checks come first, so a request that cannot train raises `LoraTrainingError` before
    anything is created on disk. Returns `(trainer, matched)` where `matched` maps each target name
    to the module names it adapts. `model`/`processor` may be passed in already loaded from `model_dir`.
    """
    if model is None or processor is None:
        model, processor = load_base_model(model_dir, hyperparameters)
    matched = match_target_modules(model, hyperparameters.target_modules)
    # A length column (image tokens per picture) only when batches are grouped by it.
    lengths_from = processor if hyperparameters.group_by_image_tokens else None
    column = task.label_column
    train_sft = build_sft_dataset(train_dataset, makers, prompt, processor=lengths_from, label_column=column)
    eval_sft = (
        build_sft_dataset(eval_dataset, makers, prompt, processor=lengths_from, label_column=column)
        if eval_dataset is not None
        else None
    )
    trainer = LoraSFTTrainer(
        model=model,
        args=hyperparameters.to_sft_config(str(output_dir), evaluate=eval_sft is not None),
        train_dataset=train_sft,
        eval_dataset=eval_sft,
        processing_class=processor,
        peft_config=hyperparameters.to_peft_config(),
        callbacks=[CheckpointCompletionCallback(), *(callbacks or [])],
        vision_lr_scale=hyperparameters.vision_lr_scale,
        sampling=hyperparameters.sampling,
        augmentation=hyperparameters.augmentation,
        train_makers=list(train_dataset[column]),  # checked by build_sft_dataset above; balanced per answer
    )
    return trainer, matched


def train_lora(
    model_dir: str | os.PathLike,
    train_dataset,
    eval_dataset,
    makers: Sequence[str],
    output_dir: str | os.PathLike,
    hyperparameters: LoraHyperparameters = LoraHyperparameters(),
    callbacks: Sequence[Any] | None = None,
    prompt: PromptTemplate | None = None,
    listeners: Sequence[Listener] = (),
    task: Task = MAKER,
) -> LoraTrainingResult:
    """Train a LoRA adapter on `model_dir`; resume from the newest complete checkpoint in `output_dir`.

    `train_dataset`/`eval_dataset`: `datasets.Dataset` with `image` (PIL) and `maker` (str) columns; for
    the class task (`task=CLASS`, `makers` then the class names, `prompt` the task's) the `source_class` column.
    `callbacks`: extra `transformers.TrainerCallback`s (e.g. to report to MLflow); they see every
    log, evaluation and save. Raises `LoraTrainingError` before training when a target module
    matches nothing, the data has a maker outside `makers`, `output_dir` holds another run, or the
    request would extend a run whose schedule cannot be extended (continuation.py).
    A run that already reached `max_steps` (or stopped early) is not trained again: its result comes
    back as it was; a smaller `max_steps` gives the checkpoints up to that step; a larger one continues
    the run. Checkpoints that fail verification are quarantined first (listed in `quarantined`); the run
    resumes from the newest good one and retrains the steps after it.
    `listeners` see the constrained classifier's validation scores at every checkpoint and may stop the
    run (a sweep's pruner); `hyperparameters.early_stopping_patience` adds the early-stopping rule.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub at trainer creation otherwise
    out = Path(output_dir)
    check_run_settings(out, hyperparameters, list(makers), str(model_dir), record=False)
    plan_run(out, hyperparameters)  # a request that cannot be met soundly fails before any work
    early = (
        EarlyStopping(hyperparameters.early_stopping_patience, hyperparameters.early_stopping_min_delta)
        if hyperparameters.early_stopping_patience
        else None
    )
    watchers = [*([early] if early else []), *listeners]
    if watchers and eval_dataset is None:
        raise LoraTrainingError("Early stopping and sweeps score checkpoints on validation: pass a validation split.")
    trainer, matched = build_trainer(
        model_dir, train_dataset, eval_dataset, makers, out, hyperparameters, callbacks, prompt, task=task
    )
    check_run_settings(out, hyperparameters, list(makers), str(model_dir))
    _, quarantined = resume_point(out)
    plan = plan_run(out, hyperparameters)
    superseded = move_superseded(out, plan.superseded)
    if superseded:
        logger.info("Continuing to %s steps: moved %s aside to retrain them", plan.schedule_steps, superseded)
    resume = plan.resume_from
    resumed_step = int(resume.name.split("-")[-1]) if resume is not None else 0
    common = {"plan": plan.describe(), "superseded": plan.superseded}
    stopped_at = early.stop_step(read_scores(out, up_to=resumed_step)) if early else None
    if plan.final_step is not None or stopped_at is not None:
        final = plan.final_step if stopped_at is None else min(stopped_at, plan.final_step or stopped_at)
        scores = read_scores(out, up_to=final)
        stop = {"step": final, "reason": early.reason(final, scores)} if stopped_at is not None else None
        logger.info("Run in %s %s; not training again.", out, stop["reason"] if stop else plan.describe())
        state = json.loads((out / f"checkpoint-{final}" / "trainer_state.json").read_text())
        state["max_steps"] = hyperparameters.max_steps
        return build_result(
            out,
            trainer,
            matched,
            state,
            resume,
            0.0,
            quarantined,
            up_to=final,
            stop=stop,
            validation_scores=scores,
            **common,
        )

    counts, _ = count_adapted_layers(trainer.model)
    logger.info("LoRA adapts %s layers (%s); %s", sum(counts.values()), counts, plan.describe())
    # The schedule's length: the request's, or the longer run's when shortening one not yet at that step.
    trainer.args.max_steps = plan.schedule_steps
    trainer.args.lr_scheduler_kwargs = hyperparameters.scheduler_kwargs(plan.schedule_steps)
    trainer.add_callback(ScheduleSaves(decay_start(hyperparameters, plan.schedule_steps), plan.stop_at))
    validation = None
    if watchers:
        validation = CheckpointValidation(
            trainer.processing_class,
            eval_dataset,
            makers,
            out,
            watchers,
            prompt=prompt,
            batch_size=hyperparameters.per_device_eval_batch_size,
            resumed_at=resumed_step,
            task=task,
        )
        trainer.add_callback(validation)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    state = {
        "global_step": trainer.state.global_step,
        "max_steps": hyperparameters.max_steps,
        "log_history": trainer.state.log_history,
    }
    return build_result(
        out,
        trainer,
        matched,
        state,
        resume,
        time.perf_counter() - started,
        quarantined,
        up_to=plan.up_to,
        stop=validation.stop if validation else None,
        validation_scores=dict(validation.scores) if validation else {},
        **common,
    )
