"""Training: LoRA fine-tuning per model, a checkpoint every N steps, resumable after a crash."""

import dagster as dg
from pydantic import Field

from car_maker_pipeline.orchestration.deployment import MODEL_STEP
from car_maker_pipeline.orchestration.partitions import model_and_task
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource, VisionLanguageModels
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import CAR_MAKER_DATASET, LORA_CHECKPOINTS
from car_maker_pipeline.training.config import LoraHyperparameters


class LoraTrainingConfig(dg.Config, LoraHyperparameters):
    """The run config of `lora_checkpoints`: every field of `LoraHyperparameters`, and how many processes train."""

    num_processes: int = Field(
        default=1,
        ge=1,
        description="Training processes. Above 1: `accelerate launch` (DDP; gloo on CPU, NCCL on GPUs) through Dagster "
        "Pipes; the batch size is per process.",
    )
    from_sweep: bool = Field(
        default=False,
        description="Train the best configuration of this model's latest lora_sweep: its parameters replace these "
        "settings' (the others stay). Scored and registered like any run; champion only by the validation rule.",
    )


@dg.asset(
    name=LORA_CHECKPOINTS,
    group_name="training",
    code_version=code_version(LORA_CHECKPOINTS),
    deps=[CAR_MAKER_DATASET],
    kinds={"pytorch", "huggingface", "mlflow"},
    **MODEL_STEP,
    description=(
        "LoRA fine-tuning with TRL's SFTTrainer (one partition per model and task: the maker, or make, model and "
        "year): loss on the answer tokens only, "
        "adapters on LFM2-VL's real projection layers, a checkpoint (adapter + processor) every N steps. "
        "Killed mid-run, the next materialization resumes from the last complete checkpoint in the same MLflow run; "
        "a checkpoint whose files changed after it was written is quarantined and its steps retrained."
    ),
)
def lora_checkpoints(
    context: dg.AssetExecutionContext,
    config: LoraTrainingConfig,  # out-of-range hyperparameters fail as the run reads it, before anything loads
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.models.checkpoint_marker import ADAPTER_WEIGHTS, recorded_digest
    from car_maker_pipeline.recording.lineage import record_training_inputs
    from car_maker_pipeline.training.partition import train_model
    from car_maker_pipeline.training.sweep_runs import sweep_best

    key, task = model_and_task(context.partition_key)
    pipeline_store = store.get()
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    dataset_record = MakerDataset.current(pipeline_store)
    hyperparameters, swept = LoraHyperparameters(**config.to_json()), {}
    if config.from_sweep:  # before any model loads: no finished sweep is an error naming what to materialize
        swept = sweep_best(pipeline_store, key, dataset_record, task)
        hyperparameters = LoraHyperparameters(**{**config.to_json(), **swept["best_params"]})
        context.log.info(f"{key}: training {swept['study_name']}'s best configuration {swept['best_params']}")
    trained = train_model(
        pipeline_store,
        key,
        models.path_or_id(key, pipeline_store),
        dataset_record,
        hyperparameters,
        num_processes=config.num_processes,
        tracking_uri=uri,
        run_tags={"dagster_run_id": context.run_id},
        launch=lambda command: dg.PipesSubprocessClient().run(command=command, context=context).get_custom_messages(),
        log=context.log,
        task=task,
    )
    result = trained.result
    # The data the run saw, each labeled batch included, as the run's MLflow inputs.
    record_training_inputs(dataset_record, uri, pipeline_store.root, trained.mlflow_run_id)
    return dg.MaterializeResult(
        metadata={
            "global_step": result.global_step,
            "training_processes": trained.world_size,
            "checkpoints": dg.MetadataValue.json(sorted(result.checkpoints)),
            "adapted_layers": dg.MetadataValue.json(result.adapted_layers),
            "trainable_parameters": result.trainable_parameters,
            "final_train_loss": result.train_loss[-1][1] if result.train_loss else float("nan"),
            "final_val_loss": result.val_loss[-1][1] if result.val_loss else float("nan"),
            "resumed_from": str(result.resumed_from) if result.resumed_from else "",
            "quarantined_checkpoints": dg.MetadataValue.json([q.to_json() for q in result.quarantined]),
            "train_seconds": result.train_seconds,
            "samples_per_second": trained.samples_per_second,
            "mlflow_run_id": trained.mlflow_run_id,
            **mlflow_tracking.links(uri, run_id=trained.mlflow_run_id),
            "path": dg.MetadataValue.path(str(trained.output_dir)),
            "additions_batches": dg.MetadataValue.json([b["batch_id"] for b in dataset_record.additions]),
            "wall_seconds": trained.wall_seconds,
            "max_steps": result.max_steps,
            "run_plan": result.plan,
            "superseded_checkpoints": dg.MetadataValue.json(result.superseded),
            **stop_metadata(result),
            **(
                {"from_sweep": swept["study_name"], "sweep_params": dg.MetadataValue.json(swept["best_params"])}
                if swept
                else {}
            ),
        },
        # The adapters themselves: a rerun that trains nothing new leaves checkpoint_accuracy up to date.
        data_version=content_version(
            {step: recorded_digest(path, ADAPTER_WEIGHTS) for step, path in result.checkpoints.items()}
        ),
    )


def stop_metadata(result) -> dict:
    """Why and where a run ended before max_steps (early stopping), and the validation scores it watched."""
    if not result.stop:
        return {"stopped_early": False}
    return {
        "stopped_early": True,
        "stopped_at_step": result.stop["step"],
        "stop_reason": result.stop["reason"],
        "steps_saved": result.max_steps - result.stop["step"],
        "checkpoint_val_accuracy": dg.MetadataValue.json(
            {str(step): scores["val_accuracy"] for step, scores in sorted(result.validation_scores.items())}
        ),
    }


training_assets = [lora_checkpoints]
