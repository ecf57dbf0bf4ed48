"""What one training call produced: its checkpoints, losses, adapted layers, and why it ended where it did.

`LoraTrainingResult` is what `train_lora` returns, what rank 0 of a distributed run reports through
Dagster Pipes (`to_json`/`from_json`) and what the `lora_checkpoints` manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
from car_maker_pipeline.training.checkpoints import QuarantinedCheckpoint, complete_checkpoints
from car_maker_pipeline.training.targets import count_adapted_layers


@dataclass
class LoraTrainingResult:
    output_dir: Path
    checkpoints: dict[int, Path]  # complete checkpoints by global step (those of this run's length)
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
    # How this call related to the folder's earlier work (continuation.RunPlan.describe()), e.g. continued.
    plan: str = ""
    # Where and why the run stopped before max_steps (early stopping, a pruned sweep trial), else None.
    stop: dict[str, Any] | None = None
    # Per checkpoint step, the constrained classifier's validation scores (when they were measured).
    validation_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    superseded: list[int] = field(default_factory=list)  # checkpoints moved aside to continue the run soundly

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
            plan=payload.get("plan", ""),
            stop=payload.get("stop"),
            validation_scores={int(s): dict(v) for s, v in payload.get("validation_scores", {}).items()},
            superseded=[int(s) for s in payload.get("superseded", [])],
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
            "plan": self.plan,
            "stop": self.stop,
            "validation_scores": {str(step): scores for step, scores in sorted(self.validation_scores.items())},
            "superseded": self.superseded,
        }


def build_result(
    out: Path,
    trainer,
    matched,
    state: dict[str, Any],
    resumed_from,
    seconds,
    quarantined,
    *,
    up_to: int,
    **extra: Any,
) -> LoraTrainingResult:
    """What the run produced; `state` is the trainer state (`global_step`, `max_steps`, `log_history`), and
    only checkpoints up to step `up_to` belong to it (a shortened run lists those of the longer one up to there)."""
    global_step, log_history = int(state["global_step"]), state["log_history"]
    counts, _ = count_adapted_layers(trainer.model)
    checkpoints = {
        step: path
        for step, path in complete_checkpoints(out, content=False).items()  # verified before resuming, or just written
        if step <= up_to
    }
    final = checkpoints.get(global_step)
    if final is None and not trainer.is_world_process_zero():
        final = out / f"checkpoint-{global_step}"  # rank 0 writes the completion marker, maybe a moment later
    if final is None:
        raise RuntimeError(f"Training ended at step {global_step} but {out} holds no complete checkpoint for it.")
    log_history = [entry for entry in log_history if int(entry.get("step", 0)) <= global_step]
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
        **extra,
    )
