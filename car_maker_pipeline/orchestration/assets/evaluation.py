"""Checkpoint evaluation: every checkpoint of a model's LoRA run scored, the best chosen and registered."""

from typing import Literal

import dagster as dg
from pydantic import Field

from car_maker_pipeline.evaluation.settings import DEFAULT_SELECTION_METRIC, SELECTION_METRICS
from car_maker_pipeline.orchestration.assets.baseline import EvaluationConfig, evaluation_inputs
from car_maker_pipeline.orchestration.deployment import MODEL_STEP
from car_maker_pipeline.orchestration.metadata import checkpoint_metadata, checkpoint_observations, log_answer_policy
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource, VisionLanguageModels
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import BASELINE_EVALUATION, CHECKPOINT_ACCURACY, LORA_CHECKPOINTS

BEATS_BASELINE = "best_checkpoint_beats_baseline"


class CheckpointEvaluationConfig(EvaluationConfig):
    robustness: bool = Field(
        default=True, description="Also score baseline and best checkpoint on each corrupted copy of test."
    )
    selection_metric: Literal[tuple(SELECTION_METRICS)] = Field(  # type: ignore[valid-type]
        default=DEFAULT_SELECTION_METRIC,
        description="How the best checkpoint is chosen, on validation: "
        + "; ".join(f"{key}: {label}" for key, label in SELECTION_METRICS.items()),
    )


@dg.asset(
    name=CHECKPOINT_ACCURACY,
    group_name="evaluation",
    code_version=code_version(CHECKPOINT_ACCURACY),
    deps=[LORA_CHECKPOINTS, BASELINE_EVALUATION],
    kinds={"pytorch", "mlflow"},
    **MODEL_STEP,
    check_specs=[
        dg.AssetCheckSpec(
            BEATS_BASELINE,
            asset=CHECKPOINT_ACCURACY,
            description="The checkpoint chosen on validation beats its base model on test.",
        )
    ],
    description=(
        "Every checkpoint of a model's LoRA run scored on validation and test with the baseline's evaluator "
        "(new checkpoints only; earlier results are reused). The best checkpoint is chosen on validation "
        "and registered in the MLflow model registry with its temperature and the confidence threshold "
        "certified for the target precision (Learn then Test); corrupted copies of test give a robustness table."
    ),
)
def checkpoint_accuracy(
    context: dg.AssetExecutionContext,
    config: CheckpointEvaluationConfig,
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
):
    # torch and transformers are imported here, not at module load (see baseline_evaluation).
    from car_maker_pipeline.recording.checkpoint_accuracy import evaluate_checkpoints_and_record

    inputs = evaluation_inputs(context, store, models, mlflow_tracking)
    key = str(context.partition_key)
    record = evaluate_checkpoints_and_record(
        **inputs,
        prompt=config.prompt(inputs["task"]),
        batch_size=config.batch_size,
        prepare_workers=config.prepare_workers,
        prefetch=config.prefetch,
        robustness=config.robustness,
        budget=config.budget(),
        warn=context.log.warning,
        target_precision=config.target_precision,
        selection_metric=config.selection_metric,
        delta=config.delta,
    )
    log_answer_policy(context, f"{key} step {record.best_step}", record.best_calibration)
    for observation in checkpoint_observations(record, CHECKPOINT_ACCURACY, key):
        context.log_event(observation)
    # What is served: the chosen adapter and the card it is registered with (temperature, threshold(s)).
    card = record.best_calibration.card_fields()
    served = {
        "adapter": record.best_adapter_digest,
        "temperature": card["temperature"],
        "threshold": card["confidence_threshold"],
    }
    if "maker_threshold" in card:  # the class task's second threshold
        served["maker_threshold"] = card["maker_threshold"]
    links = mlflow_tracking.links(
        inputs["target"].tracking_uri,
        run_id=record.mlflow_run_id,
        model_version=(record.registered_model, record.registered_version),
    )
    yield dg.MaterializeResult(metadata={**checkpoint_metadata(record), **links}, data_version=content_version(served))
    yield dg.AssetCheckResult(
        check_name=BEATS_BASELINE,
        passed=record.beats_baseline,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "best_test_accuracy": record.best_test_accuracy,
            "baseline_accuracy": record.baseline_accuracy,
            "best_step": record.best_step,
        },
    )


evaluation_assets = [checkpoint_accuracy]
