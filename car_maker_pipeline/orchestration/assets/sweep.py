"""Hyperparameter sweeps: an Optuna study of LoRA runs per model, whose best configuration lora_checkpoints can train."""

import dagster as dg

from car_maker_pipeline.orchestration.deployment import MODEL_STEP
from car_maker_pipeline.orchestration.partitions import model_and_task
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource, VisionLanguageModels
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import CAR_MAKER_DATASET, LORA_SWEEP
from car_maker_pipeline.training.config import LoraHyperparameters
from car_maker_pipeline.training.search_space import SweepSettings


class LoraSweepConfig(dg.Config, SweepSettings):
    """The run config of `lora_sweep`: how to search, and the settings trials start from (`base`, any field of
    `lora_checkpoints`' config; fields the search space names are drawn instead)."""

    base: dict = {}


@dg.asset(
    name=LORA_SWEEP,
    group_name="sweep",
    code_version=code_version(LORA_SWEEP),
    deps=[CAR_MAKER_DATASET],
    kinds={"optuna", "pytorch", "mlflow"},
    **MODEL_STEP,
    description=(
        "An Optuna study of LoRA runs (one partition per model and task): n_trials real trainings through lora_checkpoints' "
        "code, each reporting the constrained classifier's validation score at every checkpoint to a pruner "
        "(MedianPruner). The study lives in the pipeline's database, so a killed sweep resumes and two processes "
        "can share one. lora_checkpoints with from_sweep: true trains the best configuration."
    ),
)
def lora_sweep(
    context: dg.AssetExecutionContext,
    config: LoraSweepConfig,
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.orchestration.metadata import image_markdown, typed_table
    from car_maker_pipeline.redaction import redact_uri
    from car_maker_pipeline.training.sweep_runs import run_sweep

    key, task = model_and_task(context.partition_key)
    base = LoraHyperparameters(**config.base)  # a bad base setting fails here, before anything loads
    settings = SweepSettings(**config.model_dump(exclude={"base"}))
    pipeline_store = store.get()
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    record = run_sweep(
        pipeline_store,
        key,
        models.path_or_id(key, pipeline_store),
        MakerDataset.current(pipeline_store),
        base,
        settings,
        tracking_uri=uri,
        run_tags={"dagster_run_id": context.run_id},
        log=context.log,
        task=task,
    )
    figures = {f"{label}_chart": image_markdown(path, label) for label, path in record.figures.items()}
    return dg.MaterializeResult(
        metadata={
            **{name: value for name, value in record.summary.items() if name != "best_params"},
            "best_params": dg.MetadataValue.json(record.summary["best_params"]),
            "trials": typed_table(record.trials),
            "study_name": record.study_name,
            "storage": redact_uri(record.storage),
            "mlflow_run_id": record.parent_run_id,
            **mlflow_tracking.links(uri, run_id=record.parent_run_id),
            **figures,
        },
        data_version=content_version({"study": record.study_name, "best": record.summary["best_params"]}),
    )


sweep_assets = [lora_sweep]
