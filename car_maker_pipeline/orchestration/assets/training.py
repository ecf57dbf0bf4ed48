"""Training: LoRA fine-tuning per model, a checkpoint every N steps, resumable after a crash."""

import dagster as dg
from pydantic import Field

from car_maker_pipeline.orchestration.deployment import MODEL_STEP
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


@dg.asset(
    name=LORA_CHECKPOINTS,
    group_name="training",
    code_version=code_version(LORA_CHECKPOINTS),
    deps=[CAR_MAKER_DATASET],
    kinds={"pytorch", "huggingface", "mlflow"},
    **MODEL_STEP,
    description=(
        "LoRA fine-tuning with TRL's SFTTrainer (one partition per model): loss on the answer tokens only, "
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
    from car_maker_pipeline.training.partition import train_model

    key = context.partition_key
    pipeline_store = store.get()
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    dataset_record = MakerDataset.current(pipeline_store)
    trained = train_model(
        pipeline_store,
        key,
        models.path_or_id(key, pipeline_store),
        dataset_record,
        config,
        num_processes=config.num_processes,
        tracking_uri=uri,
        run_tags={"dagster_run_id": context.run_id},
        launch=lambda command: dg.PipesSubprocessClient().run(command=command, context=context).get_custom_messages(),
        log=context.log,
    )
    result = trained.result
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
            "wall_seconds": trained.wall_seconds,
        },
        # The adapters themselves: a rerun that trains nothing new leaves checkpoint_accuracy up to date.
        data_version=content_version(
            {step: recorded_digest(path, ADAPTER_WEIGHTS) for step, path in result.checkpoints.items()}
        ),
    )


training_assets = [lora_checkpoints]
