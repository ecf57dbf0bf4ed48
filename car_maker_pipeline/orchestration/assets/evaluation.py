"""Checkpoint evaluation: every checkpoint of a model's LoRA run scored, the best chosen and registered."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.orchestration.assets.baseline import EvaluationConfig
from car_maker_pipeline.orchestration.deployment import GPU_OP_TAGS
from car_maker_pipeline.orchestration.evaluation import image_markdown
from car_maker_pipeline.orchestration.partitions import model_partitions
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource, VisionLanguageModels
from car_maker_pipeline.serving.registry import Candidate, register_classifier
from car_maker_pipeline.store import (
    BASELINE_EVALUATION,
    CHECKPOINT_ACCURACY,
    LORA_CHECKPOINTS,
)
from car_maker_pipeline.tracking import (
    REGISTERED_MODEL_PREFIX,
    mlflow_run,
)

RUN_ID_FILE = "mlflow_run.json"


class CheckpointEvaluationConfig(EvaluationConfig):
    robustness: bool = Field(
        default=True, description="Also score baseline and best checkpoint on each corrupted copy of test."
    )


@dg.asset(
    name=CHECKPOINT_ACCURACY,
    group_name="evaluation",
    owners=["team:ml-platform"],
    deps=[LORA_CHECKPOINTS, BASELINE_EVALUATION],
    partitions_def=model_partitions,
    kinds={"pytorch", "mlflow"},
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            "best_checkpoint_beats_baseline",
            asset=CHECKPOINT_ACCURACY,
            description="The checkpoint chosen on validation beats its base model on test.",
        )
    ],
    description=(
        "Every checkpoint of a model's LoRA run scored on validation and test with the baseline's evaluator "
        "(new checkpoints only; earlier results are reused). The best checkpoint is chosen on validation "
        "accuracy and registered in the MLflow model registry as a pyfunc model (alias challenger; champion when it beats "
        "the champion's validation accuracy); corrupted copies of test give a robustness table."
    ),
)
def checkpoint_accuracy(
    context: dg.AssetExecutionContext,
    config: CheckpointEvaluationConfig,
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
):
    import mlflow

    from car_maker_pipeline.evaluation.checkpoints import accuracy_chart, score_checkpoints
    from car_maker_pipeline.evaluation.reports import save_figure

    pipeline_store = store.get()
    key = context.partition_key
    prompt = config.prompt()
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    training = pipeline_store.read_manifest(LORA_CHECKPOINTS, key)
    baseline = pipeline_store.read_manifest(BASELINE_EVALUATION, key)
    baseline_accuracy = baseline["summary"]["accuracy"]
    dataset_record = pipeline_store.maker_dataset()
    dataset = dataset_record.load()
    checkpoints = {int(step): Path(path) for step, path in training["checkpoints"].items()}
    loaded = models.load(key, pipeline_store)
    out_root = pipeline_store.asset_dir(CHECKPOINT_ACCURACY, key) / Path(training["output_dir"]).name
    scores = score_checkpoints(
        loaded.model,
        loaded.processor,
        checkpoints,
        dataset,
        dataset_record.makers,
        out_root,
        baseline_accuracy=baseline_accuracy,
        val_loss={int(step): loss for step, loss in training["val_loss"]},
        prompt=prompt,
        batch_size=config.batch_size,
        corrupted_splits=dataset_record.corrupted_splits if config.robustness else [],
    )
    table_path = out_root / "checkpoint_accuracy.parquet"
    scores.table.to_parquet(table_path, index=False)
    chart_path = save_figure(
        accuracy_chart(scores.table, baseline_accuracy, f"{key}: accuracy by checkpoint"),
        out_root / "accuracy_by_step.png",
    )
    best = scores.table.set_index("step").loc[scores.best_step]

    with mlflow_run(
        uri,
        pipeline_store.root,
        run_name=f"checkpoints-{key}",
        tags={
            "dagster_run_id": context.run_id,
            "model_key": key,
            "stage": "checkpoint_accuracy",
            "training_run_id": training["mlflow_run_id"],
        },
        orphans_of=context.instance,
    ) as run:
        mlflow.log_params(
            {
                "model_key": key,
                "base_model": training["base_model"],
                "base_model_revision": loaded.revision,
                "prompt_hash": prompt.fingerprint(dataset_record.makers),
                "num_checkpoints": len(checkpoints),
                "best_step": scores.best_step,
                "selection": "validation accuracy",
            }
        )
        for row in scores.table.itertuples():
            mlflow.log_metrics(
                {
                    "val_accuracy": row.val_accuracy,
                    "test_accuracy": row.accuracy,
                    "test_ci_low": row.ci_low,
                    "test_ci_high": row.ci_high,
                    "test_macro_accuracy": row.macro_accuracy,
                },
                step=int(row.step),
            )
        mlflow.log_metrics(
            {
                "best_test_accuracy": float(best["accuracy"]),
                "best_val_accuracy": float(best["val_accuracy"]),
                "baseline_test_accuracy": baseline_accuracy,
            }
        )
        mlflow.log_table(scores.table, artifact_file=f"checkpoint_accuracy_{key}.json")
        if not scores.robustness.empty:
            mlflow.log_table(scores.robustness, artifact_file=f"robustness_{key}.json")
        mlflow.log_artifact(str(chart_path))
        mlflow.log_artifact(str(table_path))
        registered = register_classifier(
            Candidate.of_checkpoint(
                key,
                scores.best_checkpoint,
                loaded,
                dataset_record.makers,
                prompt,
                step=scores.best_step,
                val_accuracy=best["val_accuracy"],
                test_accuracy=best["accuracy"],
            ),
            uri=uri,
            dataset_record=dataset_record,
            tags={"dagster_run_id": context.run_id},
        )
        version = registered.version

    pipeline_store.write_manifest(
        CHECKPOINT_ACCURACY,
        {
            "table": str(table_path),
            "best_step": scores.best_step,
            "best_checkpoint": str(scores.best_checkpoint),
            "registered_version": version,
            "mlflow_run_id": run.info.run_id,
            "robustness": scores.robustness.to_dict("records"),
            "baseline_accuracy": baseline_accuracy,
        },
        partition=key,
    )
    shown = scores.table.copy()
    for column in ("val_accuracy", "accuracy", "ci_low", "ci_high", "macro_accuracy", "change_vs_baseline"):
        shown[column] = shown[column].map(
            lambda value, column=column: f"{value:+.1%}" if column == "change_vs_baseline" else f"{value:.1%}"
        )
    metadata = {
        "accuracy_by_step": dg.MetadataValue.md(shown.to_markdown(index=False)),
        "accuracy_chart": image_markdown(chart_path, "accuracy by step"),
        "best_step": scores.best_step,
        "best_test_accuracy": float(best["accuracy"]),
        "best_val_accuracy": float(best["val_accuracy"]),
        "baseline_accuracy": baseline_accuracy,
        "registered_model": f"{REGISTERED_MODEL_PREFIX}{key} v{version}",
        **registered.metadata(),
        "mlflow_run_id": run.info.run_id,
        "table": dg.MetadataValue.path(str(table_path)),
    }
    if not scores.robustness.empty:
        metadata["accuracy_by_corruption"] = dg.MetadataValue.md(
            scores.robustness.to_markdown(index=False, floatfmt=".3f")
        )
    for row in scores.table.itertuples():
        context.log_event(
            dg.AssetObservation(
                asset_key=CHECKPOINT_ACCURACY,
                partition=key,
                metadata={
                    "step": int(row.step),
                    "test_accuracy": float(row.accuracy),
                    "val_accuracy": float(row.val_accuracy),
                },
            )
        )
    yield dg.MaterializeResult(metadata=metadata)
    beats = float(best["accuracy"]) > baseline_accuracy
    yield dg.AssetCheckResult(
        check_name="best_checkpoint_beats_baseline",
        passed=beats,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "best_test_accuracy": float(best["accuracy"]),
            "baseline_accuracy": baseline_accuracy,
            "best_step": scores.best_step,
        },
    )


evaluation_assets = [checkpoint_accuracy]
