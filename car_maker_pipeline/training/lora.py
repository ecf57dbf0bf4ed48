"""LoRA fine-tuning of an LFM2-VL model into a car-maker classifier: plain functions, no Dagster.

    result = train_lora(model_dir, train_ds, val_ds, makers, output_dir, LoraTrainingConfig())

The datasets have an `image` column (PIL images) and a `maker` column (str). Each row becomes a
TRL prompt/completion vision example: the prompt is `PromptTemplate().messages(makers)` (system
message, then the image and the question with the list of makers), the completion is the
assistant's bare maker name, and the image rides along in the `image` column. TRL 1.16's
`DataCollatorForVisionLanguageModeling` then renders prompt and completion with the processor's
chat template, tokenizes them separately and sets the labels of every prompt token (system text,
image placeholders, question, `<|im_start|>assistant\\n`) and of the padding to -100: the loss is on
the answer tokens, the `<|im_end|>` that closes the turn and the newline the template writes after it.

Checkpoints: every `checkpoint_every_n_steps` steps (and at the last step) the validation loss is
computed and `output_dir/checkpoint-<step>` is written by the HF Trainer: the LoRA adapter
(`adapter_model.safetensors` + `adapter_config.json`), the processor, optimizer, scheduler, RNG and
trainer state. A callback then writes `checkpoint_complete.json` (file names and sizes) last, so a
checkpoint cut short by a crash or SIGKILL is recognisable: calling `train_lora` again with the same
`output_dir` moves incomplete checkpoints to `output_dir/incomplete/` and resumes from the newest
complete one, ending at the same global step as an uninterrupted run.

Target modules. The default is Liquid's own VLM recipe (leap-finetune `LFM2_VLM_LORA_CONFIG`):
`q_proj k_proj v_proj out_proj in_proj fc1 fc2 linear_1 linear_2`, given as bare names, which PEFT
matches as suffixes of module names. On LFM2-VL these names adapt
- language model: attention `self_attn.{q,k,v,out}_proj` and both short-conv projections
  `conv.in_proj` and `conv.out_proj` (`out_proj` matches both; this is deliberate and what Liquid's
  recipe does too: the conv block's output projection is the analogue of the attention output);
  the gated MLP `feed_forward.w1/w2/w3` is left frozen;
- vision tower (SigLIP2): attention `self_attn.{q,k,v,out}_proj` and MLP `mlp.fc1/fc2`;
- projector: `linear_1`, `linear_2`.
For LFM2-VL-450M that is 44 language-model layers (6 attention x 4 + 10 conv x 2), 72 vision
layers (12 x 6) and 2 projector layers. `vision_lr_scale` (Liquid uses 0.1) lowers the learning
rate of the LoRA weights inside the vision tower only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from car_maker_pipeline.storage import write_json_atomic

logger = logging.getLogger(__name__)

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

CHECKPOINT_MARKER = "checkpoint_complete.json"
CHECKPOINT_REQUIRED_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json")
TRAINING_CONFIG_FILE = "lora_training_config.json"
INCOMPLETE_DIR = "incomplete"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

COMPONENTS = ("vision_tower", "projector", "language_model")


class LoraTrainingError(ValueError):
    """A LoRA training request that cannot be run as given; the message says what to change."""


@dataclass(frozen=True)
class LoraTrainingConfig:
    """Hyperparameters of one LoRA run. Defaults are tuned for the tiny demo models on a CPU.

    With these defaults tiny-s goes from chance (1/6) to ~90% test accuracy on the 6-maker synthetic
    demo task by step 200 and ~96% by step 350-400 (batch 32, about 100 s on 2 CPU cores). Batch
    size matters more than steps for the tiny models: at batch 8 the image signal drowns in
    gradient noise (600 steps of batch 8 stayed near 50%). For the real LFM2-VL models use a lower
    `learning_rate` (about 2e-4), `vision_lr_scale=0.1` (Liquid's recipe), a batch that fits the
    GPU (with `gradient_accumulation_steps`) and `max_steps` sized to the data.
    """

    learning_rate: float = 5e-3
    max_steps: int = 400  # > 0 wins over num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    checkpoint_every_n_steps: int = 50  # save_steps and eval_steps
    seed: int = 0
    vision_lr_scale: float = 1.0
    gradient_checkpointing: bool = False
    warmup_steps: int = 5
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_total_limit: int | None = None
    bf16: bool | None = None  # None: bf16 mixed precision on a CUDA GPU that supports it, fp32 otherwise
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = []
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            problems.append("set max_steps > 0 or num_train_epochs > 0")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "checkpoint_every_n_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_steps > 0 and self.checkpoint_every_n_steps > self.max_steps:
            problems.append(
                f"checkpoint_every_n_steps ({self.checkpoint_every_n_steps}) is larger than max_steps "
                f"({self.max_steps}), so no intermediate checkpoint would be written"
            )
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.vision_lr_scale < 0:
            problems.append(f"vision_lr_scale must be >= 0 (got {self.vision_lr_scale})")
        if not self.target_modules or isinstance(self.target_modules, str):
            problems.append("target_modules must be a non-empty list of module names")
        if problems:
            raise LoraTrainingError("Invalid LoRA training config: " + "; ".join(problems) + ".")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


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
        }


# --------------------------------------------------------------------------------------------
# Target modules
# --------------------------------------------------------------------------------------------


def component_of(module_name: str) -> str:
    """Which part of LFM2-VL a module belongs to: vision_tower, projector, language_model or other."""
    if ".vision_tower." in f".{module_name}.":
        return "vision_tower"
    if ".multi_modal_projector." in f".{module_name}.":
        return "projector"
    if ".language_model." in f".{module_name}.":
        return "language_model"
    return "other"


def _matches(module_name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the full name, or a suffix starting at a dot.
    return module_name == target or module_name.endswith("." + target)


def match_target_modules(model, target_modules: Sequence[str]) -> dict[str, list[str]]:
    """Module names of `model` that each target name would adapt (PEFT's suffix rule, Linear layers).

    Raises `LoraTrainingError` naming every target that matches no Linear layer, with the names of
    the Linear layers that do exist, before any adapter is created.
    """
    import torch

    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    matched = {target: [name for name in linear_names if _matches(name, target)] for target in target_modules}
    missing = [target for target, names in matched.items() if not names]
    if missing:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise LoraTrainingError(
            f"LoRA target module(s) {missing} match no Linear layer of this model, so they would silently "
            f"train nothing. Linear layer names in this model: {leaf_names}. Fix target_modules."
        )
    return matched


def count_adapted_layers(model) -> tuple[dict[str, int], list[str]]:
    """Per-component count of LoRA-adapted layers in a PEFT model, and their names."""
    from peft.tuners.lora import LoraLayer

    names = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    counts = {component: 0 for component in COMPONENTS}
    for name in names:
        component = component_of(name)
        counts[component] = counts.get(component, 0) + 1
    return counts, names


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def check_training_data(dataset, makers: Sequence[str]) -> list[str]:
    """The dataset's makers; raises if a column is missing, it is empty or has a maker not in `makers`."""
    missing = [c for c in ("image", "maker") if c not in dataset.column_names]
    if missing:
        raise LoraTrainingError(
            f"The training data needs columns 'image' and 'maker'; missing {missing} (has {dataset.column_names})."
        )
    if len(dataset) == 0:
        raise LoraTrainingError("The training data is empty.")
    labels = list(dataset["maker"])
    unknown = sorted(set(labels) - set(makers))
    if unknown:
        raise LoraTrainingError(f"Makers {unknown} appear in the data but not in the maker list {list(makers)}.")
    return labels


def build_sft_dataset(dataset, makers: Sequence[str], prompt=None):
    """Turn an `image` + `maker` dataset into a TRL prompt/completion vision dataset.

    Columns: `prompt` (the chat messages up to the answer, one image placeholder), `completion`
    (the assistant message with the bare maker name) and `image` (TRL's collator turns it into
    `images=[image]`). The image column is carried over without being decoded or re-encoded; a
    read-time transform converts each picture to RGB.
    """
    from car_maker_pipeline.model_inputs.prompt import PromptTemplate

    prompt = prompt or PromptTemplate()
    makers = list(makers)
    labels = check_training_data(dataset, makers)
    messages = prompt.messages(makers)
    extra = [c for c in dataset.column_names if c not in ("image", "maker")]
    out = dataset.remove_columns(extra) if extra else dataset
    out = out.add_column("prompt", [messages] * len(out))
    out = out.add_column("completion", [prompt.answer_messages(m) for m in labels])
    out = out.remove_columns(["maker"])
    # LFM2-VL's image processor fails on grayscale, palette, RGBA and CMYK pictures and on batches mixing
    # extreme strips with photos: convert on read.
    return out.with_transform(_rgb_images)


def _rgb_images(batch: dict[str, list]) -> dict[str, list]:
    from car_maker_pipeline.model_inputs.images import model_ready  # the evaluator's image rule, so train = test

    batch["image"] = [model_ready(image) for image in batch["image"]]
    return batch


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint is complete when its marker exists and every file it lists has the recorded size."""
    path = Path(path)
    marker = path / CHECKPOINT_MARKER
    if not marker.is_file() or not all((path / f).is_file() for f in CHECKPOINT_REQUIRED_FILES):
        return False
    try:
        files = json.loads(marker.read_text())["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> dict[int, Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return {}
    found = {}
    for child in out.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def complete_checkpoints(output_dir: str | os.PathLike) -> dict[int, Path]:
    return {step: path for step, path in list_checkpoints(output_dir).items() if is_complete_checkpoint(path)}


def quarantine_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Move every incomplete `checkpoint-*` folder to `output_dir/incomplete/`; returns the new paths."""
    out = Path(output_dir)
    moved = []
    for _step, path in list_checkpoints(out).items():
        if is_complete_checkpoint(path):
            continue
        target = out / INCOMPLETE_DIR / f"{path.name}-{int(time.time() * 1000)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        logger.warning("Checkpoint %s is incomplete (interrupted save); moved it to %s", path, target)
        moved.append(target)
    return moved


def _mark_checkpoint_complete(path: Path, global_step: int) -> None:
    files = {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_MARKER and not p.name.startswith(".")
    }
    for name in files:  # make the data durable before the marker says it is there
        with open(path / name, "rb") as handle:
            os.fsync(handle.fileno())
    write_json_atomic(path / CHECKPOINT_MARKER, {"global_step": global_step, "files": files})


def _completion_callback():
    from transformers import TrainerCallback

    class CheckpointCompletionCallback(TrainerCallback):
        """Runs after the Trainer has written a checkpoint (trainer_state.json last): mark it complete."""

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # under DDP every rank writes its rng_state_<rank>.pth: all done before the marker
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    _mark_checkpoint_complete(path, state.global_step)
            return control

    return CheckpointCompletionCallback()


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def _use_bf16(config: LoraTrainingConfig) -> bool:
    import torch

    if config.bf16 is not None:
        return config.bf16
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _trainer_class():
    from trl import SFTTrainer

    class LoraSFTTrainer(SFTTrainer):
        """SFTTrainer whose optimizer can give the vision tower's LoRA weights a lower learning rate."""

        vision_lr_scale: float = 1.0

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
                for (vision, decayed), params in sorted(
                    groups.items()
                )  # fixed order: optimizer state resumes by position
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
            return self.optimizer

    return LoraSFTTrainer


def load_base_model(model_dir: str | os.PathLike, config: LoraTrainingConfig):
    """The base model and processor, in fp32 (or bf16 weights when training in bf16 on a GPU)."""
    # The pipeline's one loader: safetensors only, never remote code, image token checked.
    from car_maker_pipeline.models.loading import load_model_and_processor

    loaded = load_model_and_processor(
        str(model_dir), device="cpu", dtype="bfloat16" if _use_bf16(config) else "float32"
    )
    return loaded.model.train(), loaded.processor


def build_trainer(
    model_dir: str | os.PathLike,
    train_dataset,
    eval_dataset,
    makers: Sequence[str],
    output_dir: str | os.PathLike,
    config: LoraTrainingConfig = LoraTrainingConfig(),
    callbacks: Sequence[Any] | None = None,
    prompt=None,
    model=None,
    processor=None,
):
    """Validate the target modules, then build the TRL `SFTTrainer` (with PEFT LoRA) for one run.

    Returns `(trainer, matched)` where `matched` maps each target name to the module names it adapts.
    `model`/`processor` may be passed in already loaded (from `model_dir`) to save a reload.
    """
    from peft import LoraConfig
    from trl import SFTConfig

    if model is None or processor is None:
        model, processor = load_base_model(model_dir, config)
    matched = match_target_modules(model, config.target_modules)

    train_sft = build_sft_dataset(train_dataset, makers, prompt)
    eval_sft = build_sft_dataset(eval_dataset, makers, prompt) if eval_dataset is not None else None

    bf16 = _use_bf16(config)
    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.checkpoint_every_n_steps,
        save_total_limit=config.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG state too: resuming continues the same run
        eval_strategy="steps" if eval_sft is not None else "no",
        eval_steps=config.checkpoint_every_n_steps,
        prediction_loss_only=True,  # never gather full-vocabulary logits of the validation set
        max_length=None,  # never truncate: a cut prompt loses image tokens, a cut answer trains nothing
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=config.dataloader_num_workers,
        ddp_find_unused_parameters=False,  # under DDP every LoRA weight takes part in every forward pass
        report_to="none",
        push_to_hub=False,
        hub_token=None,
        disable_tqdm=True,
        use_cpu=not _cuda_available(),
    )
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer_cls = _trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_sft,
        eval_dataset=eval_sft,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[_completion_callback(), *(callbacks or [])],
    )
    trainer.vision_lr_scale = config.vision_lr_scale
    return trainer, matched


def _rank() -> int:
    """This process's global rank under accelerate/torchrun; 0 when training in one process."""
    return int(os.environ.get("RANK", "0"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_same_config(output_dir: Path, config: LoraTrainingConfig, makers: Sequence[str], model_dir) -> None:
    """A run resumes only with the settings it started with; anything else would mix two runs."""
    wanted = {"config": config.to_json(), "makers": list(makers), "model": str(model_dir)}
    path = output_dir / TRAINING_CONFIG_FILE
    if path.is_file() and complete_checkpoints(output_dir):
        stored = json.loads(path.read_text())
        if stored != wanted:
            changed = sorted(
                k
                for k in set(stored.get("config", {})) | set(wanted["config"])
                if stored.get("config", {}).get(k) != wanted["config"].get(k)
            )
            if stored.get("makers") != wanted["makers"]:
                changed.append("makers")
            if stored.get("model") != wanted["model"]:
                changed.append("model")
            raise LoraTrainingError(
                f"{output_dir} holds checkpoints of a run with different settings ({', '.join(changed)}). "
                "Resume with the same settings, or use a new output_dir."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, wanted)


def train_lora(
    model_dir: str | os.PathLike,
    train_dataset,
    eval_dataset,
    makers: Sequence[str],
    output_dir: str | os.PathLike,
    config: LoraTrainingConfig = LoraTrainingConfig(),
    callbacks: Sequence[Any] | None = None,
    prompt=None,
) -> LoraTrainingResult:
    """Train a LoRA adapter on `model_dir`; resume from the newest complete checkpoint in `output_dir`.

    `train_dataset`/`eval_dataset`: `datasets.Dataset` with `image` (PIL) and `maker` (str) columns.
    `callbacks`: extra `transformers.TrainerCallback`s (e.g. to report to MLflow); they see every
    log, evaluation and save. Raises `LoraTrainingError` before training when a target module
    matches nothing, the data has a maker outside `makers`, or `output_dir` holds another run.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub at trainer creation otherwise
    out = Path(output_dir)
    model, processor = load_base_model(model_dir, config)
    match_target_modules(model, config.target_modules)  # fail fast: nothing written, nothing trained
    check_training_data(train_dataset, makers)
    if eval_dataset is not None:
        check_training_data(eval_dataset, makers)

    _check_same_config(out, config, makers, model_dir)
    if _rank() == 0:  # under accelerate/torchrun every process gets here; one moves folders
        quarantine_incomplete_checkpoints(out)
    done = complete_checkpoints(out)
    resume = done[max(done)] if done else None

    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text())
        if state.get("max_steps", -1) > 0 and state["global_step"] >= state["max_steps"]:
            logger.info("Run in %s already finished at step %s; not training again.", out, state["global_step"])
            trainer, matched = build_trainer(
                model_dir, train_dataset, eval_dataset, makers, out, config, callbacks, prompt, model, processor
            )
            return _result(
                out, trainer, matched, state["log_history"], state["global_step"], state["max_steps"], resume, 0.0
            )

    trainer, matched = build_trainer(
        model_dir, train_dataset, eval_dataset, makers, out, config, callbacks, prompt, model, processor
    )
    counts, _ = count_adapted_layers(trainer.model)
    logger.info("LoRA adapts %s layers (%s)", sum(counts.values()), counts)
    if resume is not None:
        logger.info("Resuming LoRA training from %s", resume)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.perf_counter() - started
    return _result(
        out,
        trainer,
        matched,
        trainer.state.log_history,
        trainer.state.global_step,
        trainer.state.max_steps,
        resume,
        seconds,
    )


def _result(out, trainer, matched, log_history, global_step, max_steps, resumed_from, seconds) -> LoraTrainingResult:
    counts, _ = count_adapted_layers(trainer.model)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    checkpoints = complete_checkpoints(out)
    final = checkpoints.get(global_step)
    if final is None and not trainer.is_world_process_zero():
        final = out / f"checkpoint-{global_step}"  # rank 0 writes the completion marker, maybe a moment later
    if final is None:
        raise RuntimeError(f"Training ended at step {global_step} but {out} holds no complete checkpoint for it.")
    train_loss = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e]
    val_loss = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e]
    return LoraTrainingResult(
        output_dir=out,
        checkpoints=checkpoints,
        final_checkpoint=final,
        global_step=int(global_step),
        max_steps=int(max_steps),
        train_loss=train_loss,
        val_loss=val_loss,
        log_history=list(log_history),
        adapted_layers=counts,
        adapted_layers_by_target={target: len(names) for target, names in matched.items()},
        trainable_parameters=trainable,
        total_parameters=total,
        resumed_from=resumed_from,
        train_seconds=seconds,
    )
