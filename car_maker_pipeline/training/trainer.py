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

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import SFTTrainer

from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.loading import load_model_and_processor
from car_maker_pipeline.training.augmentation import AugmentedRows
from car_maker_pipeline.training.checkpoints import (
    CheckpointCompletionCallback,
    QuarantinedCheckpoint,
    check_run_settings,
    complete_checkpoints,
    finished_state,
    resume_point,
)
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.sampling import TrainDraws, trainer_draws
from car_maker_pipeline.training.sft_data import build_sft_dataset
from car_maker_pipeline.training.targets import component_of, count_adapted_layers, match_target_modules

logger = logging.getLogger(__name__)


@dataclass
class LoraTrainingResult:
    output_dir: Path
    checkpoints: dict[int, Path]  # complete checkpoints by global step
    final_checkpoint: Path  # the checkpoint at `global_step`: adapter + processor
    global_step: int
    max_steps: int
    train_loss: list[tuple[int, float]]  # (step, loss) as logged
    val_loss: list[tuple[int, float]]  # (step, eval_loss), one per checkpoint
    log_history: list[dict[str, Any]]  # the Trainer's full log history
    adapted_layers: dict[str, int]  # per component: vision_tower, projector, language_model
    adapted_layers_by_target: dict[str, int]  # per configured target module name
    trainable_parameters: int
    total_parameters: int
    resumed_from: Path | None
    train_seconds: float
    quarantined: list[QuarantinedCheckpoint] = field(default_factory=list)  # moved aside by this call, and why
    # The processor's image-token settings the run trained with (ImageTokenBudget fields, all filled):
    # its checkpoints are evaluated with the same unless the evaluation says otherwise.
    image_token_budget: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LoraTrainingResult:
        """The result another process reported (distributed training): everything but the full log history."""
        return cls(
            output_dir=Path(payload["output_dir"]),
            checkpoints={int(step): Path(path) for step, path in payload["checkpoints"].items()},
            final_checkpoint=Path(payload["final_checkpoint"]),
            global_step=int(payload["global_step"]),
            max_steps=int(payload["max_steps"]),
            train_loss=[(int(step), float(loss)) for step, loss in payload["train_loss"]],
            val_loss=[(int(step), float(loss)) for step, loss in payload["val_loss"]],
            log_history=[],
            adapted_layers=dict(payload["adapted_layers"]),
            adapted_layers_by_target=dict(payload["adapted_layers_by_target"]),
            trainable_parameters=int(payload["trainable_parameters"]),
            total_parameters=int(payload["total_parameters"]),
            resumed_from=Path(payload["resumed_from"]) if payload["resumed_from"] else None,
            train_seconds=float(payload["train_seconds"]),
            quarantined=[QuarantinedCheckpoint.from_json(q) for q in payload.get("quarantined", [])],
            image_token_budget=dict(payload.get("image_token_budget", {})),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "checkpoints": {str(step): str(path) for step, path in sorted(self.checkpoints.items())},
            "final_checkpoint": str(self.final_checkpoint),
            "global_step": self.global_step,
            "max_steps": self.max_steps,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "adapted_layers": self.adapted_layers,
            "adapted_layers_by_target": self.adapted_layers_by_target,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "train_seconds": self.train_seconds,
            "quarantined": [q.to_json() for q in self.quarantined],
            "image_token_budget": self.image_token_budget,
        }


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
    train_sft = build_sft_dataset(train_dataset, makers, prompt, processor=lengths_from)
    eval_sft = (
        build_sft_dataset(eval_dataset, makers, prompt, processor=lengths_from) if eval_dataset is not None else None
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
        train_makers=list(train_dataset["maker"]),  # checked by build_sft_dataset above
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
) -> LoraTrainingResult:
    """Train a LoRA adapter on `model_dir`; resume from the newest complete checkpoint in `output_dir`.

    `train_dataset`/`eval_dataset`: `datasets.Dataset` with `image` (PIL) and `maker` (str) columns.
    `callbacks`: extra `transformers.TrainerCallback`s (e.g. to report to MLflow); they see every
    log, evaluation and save. Raises `LoraTrainingError` before training when a target module
    matches nothing, the data has a maker outside `makers`, or `output_dir` holds another run.
    A run that already reached `max_steps` is not trained again: its result comes back as it was.
    Checkpoints that fail verification are quarantined first (listed in `quarantined`); the run
    resumes from the newest good one and retrains the steps after it.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub at trainer creation otherwise
    out = Path(output_dir)
    trainer, matched = build_trainer(
        model_dir, train_dataset, eval_dataset, makers, out, hyperparameters, callbacks, prompt
    )
    check_run_settings(out, hyperparameters, list(makers), str(model_dir))
    resume, quarantined = resume_point(out)
    finished = finished_state(resume)
    if finished is not None:
        logger.info("Run in %s already finished at step %s; not training again.", out, finished["global_step"])
        return _result(out, trainer, matched, finished, resume, 0.0, quarantined)

    counts, _ = count_adapted_layers(trainer.model)
    logger.info("LoRA adapts %s layers (%s)", sum(counts.values()), counts)
    if resume is not None:
        logger.info("Resuming LoRA training from %s", resume)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    state = {
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "log_history": trainer.state.log_history,
    }
    return _result(out, trainer, matched, state, resume, time.perf_counter() - started, quarantined)


def _result(
    out: Path, trainer, matched, state: dict[str, Any], resumed_from, seconds, quarantined
) -> LoraTrainingResult:
    """What the run produced; `state` is the trainer state (`global_step`, `max_steps`, `log_history`)."""
    global_step, log_history = int(state["global_step"]), state["log_history"]
    counts, _ = count_adapted_layers(trainer.model)
    checkpoints = complete_checkpoints(out, content=False)  # verified before resuming, or just written
    final = checkpoints.get(global_step)
    if final is None and not trainer.is_world_process_zero():
        final = out / f"checkpoint-{global_step}"  # rank 0 writes the completion marker, maybe a moment later
    if final is None:
        raise RuntimeError(f"Training ended at step {global_step} but {out} holds no complete checkpoint for it.")
    return LoraTrainingResult(
        output_dir=out,
        checkpoints=checkpoints,
        final_checkpoint=final,
        global_step=global_step,
        max_steps=int(state["max_steps"]),
        train_loss=[(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e],
        val_loss=[(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e],
        log_history=list(log_history),
        adapted_layers=counts,
        adapted_layers_by_target={target: len(names) for target, names in matched.items()},
        trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in trainer.model.parameters()),
        resumed_from=resumed_from,
        train_seconds=seconds,
        quarantined=quarantined,
        image_token_budget=ImageTokenBudget.of(trainer.processing_class).to_json(),
    )
