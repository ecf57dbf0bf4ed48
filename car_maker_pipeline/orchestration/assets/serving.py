"""Serving: the champion exported merged, and batch predictions over a folder of incoming images."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from car_maker_pipeline.orchestration.deployment import MODEL_STEP
from car_maker_pipeline.orchestration.metadata import typed_table
from car_maker_pipeline.orchestration.partitions import model_and_task
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import CHECKPOINT_ACCURACY, MAKER_PREDICTIONS, MERGED_MODEL, PipelineStore


class IncomingImages(dg.ConfigurableResource):
    """The folder `maker_predictions` classifies and `incoming_images_sensor` watches."""

    path: str | None = Field(
        default=None, description="Folder of incoming images (default: CAR_MAKER_HOME/incoming_images)."
    )

    def folder(self, store: PipelineStore) -> Path:
        from car_maker_pipeline.serving.batch import INCOMING_FOLDER

        return Path(self.path).expanduser() if self.path else store.root / INCOMING_FOLDER


class MergedModelConfig(dg.Config):
    batch_size: int = Field(default=16, gt=0, description="Images per forward pass when checking the merged model.")
    max_images: int | None = Field(default=None, gt=0, description="Check on the first N test images only.")


@dg.asset(
    name=MERGED_MODEL,
    group_name="serving",
    code_version=code_version(MERGED_MODEL),
    deps=[CHECKPOINT_ACCURACY],
    kinds={"pytorch", "huggingface", "safetensors"},
    **MODEL_STEP,
    check_specs=[
        dg.AssetCheckSpec(
            "merged_answers_equal_adapter",
            asset=MERGED_MODEL,
            description="On the test split, the merged model gives every image the adapter's maker (and probability).",
        )
    ],
    description=(
        "The @champion of car-<task>-<model> merged into its base model (merge_and_unload): a plain transformers "
        "folder in safetensors with its processor and chat template, loadable without PEFT. Both the adapter and "
        "the merged model are scored on the test split with the same evaluator; accuracy and speed are recorded."
    ),
)
def merged_model(
    context: dg.AssetExecutionContext,
    config: MergedModelConfig,
    store: StoreResource,
    mlflow_tracking: MlflowTracking,
):
    from car_maker_pipeline.data.maker_dataset import MakerDataset
    from car_maker_pipeline.data.tasks import dataset_answers
    from car_maker_pipeline.recording.registry import champion_version, check_version_makers, load_version
    from car_maker_pipeline.serving.export import export_merged

    pipeline_store = store.get()
    model_key, task = model_and_task(context.partition_key)
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    champion = champion_version(uri, model_key, task)
    dataset = MakerDataset.current(pipeline_store)
    rows = dataset.load()
    check_version_makers(champion, dataset_answers(task, dataset.makers, rows))
    pyfunc = load_version(uri, champion.name, str(champion.version), batch_size=config.batch_size)
    export, _, _ = export_merged(
        pyfunc.unwrap_python_model().predictor,
        rows["test"],
        pipeline_store.asset_dir(MERGED_MODEL, task.partition(model_key)) / f"v{champion.version}",
        registered_model=champion.name,
        version=str(champion.version),
        max_images=config.max_images,
    )
    pipeline_store.write_manifest(MERGED_MODEL, export.to_json(), partition=task.partition(model_key))
    yield dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(export.path),
            "source_model": f"{export.registered_model} v{export.version} (@champion)",
            "accuracy": export.accuracy,
            "adapter_accuracy": export.adapter_accuracy,
            "num_images": export.num_images,
            "agreement_with_adapter": export.agreement,
            "max_probability_difference": export.max_probability_difference,
            "merged_images_per_second": export.merged_images_per_second,
            "adapter_images_per_second": export.adapter_images_per_second,
            "size_mb": export.size_bytes / 1e6,
        },
        data_version=content_version({"registered_model": export.registered_model, "version": export.version}),
    )
    yield dg.AssetCheckResult(
        check_name="merged_answers_equal_adapter",
        passed=export.identical_answers,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"agreement": export.agreement, "max_probability_difference": export.max_probability_difference},
    )


@dg.asset(
    name=MAKER_PREDICTIONS,
    group_name="serving",
    code_version=code_version(MAKER_PREDICTIONS),
    deps=[CHECKPOINT_ACCURACY],
    kinds={"pytorch", "mlflow", "parquet"},
    **MODEL_STEP,
    description=(
        "Every file in the incoming-images folder (resource `incoming_images`) classified by the @champion of "
        "car-<task>-<model>: a parquet of file name, answer (a maker, or unsure below the registered threshold; the "
        "class task: a class, else its maker, else unsure) and its level, the three most probable answers with "
        "their probabilities, and model version. A file that cannot be "
        "classified gets a row with the reason in `error`; it never fails the batch."
    ),
)
def maker_predictions(
    context: dg.AssetExecutionContext,
    store: StoreResource,
    mlflow_tracking: MlflowTracking,
    incoming_images: IncomingImages,
) -> dg.MaterializeResult:
    import pandas as pd

    from car_maker_pipeline.recording.registry import champion_version, load_version
    from car_maker_pipeline.serving.batch import predict_folder
    from car_maker_pipeline.serving.predictor import IMAGE_COLUMN

    pipeline_store = store.get()
    model_key, task = model_and_task(context.partition_key)
    key = task.partition(model_key)
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    champion = champion_version(uri, model_key, task)
    version = str(champion.version)

    def load_predict():
        model = load_version(uri, champion.name, version)
        return lambda blobs: model.predict(pd.DataFrame({IMAGE_COLUMN: blobs}))

    batch = predict_folder(
        load_predict,
        incoming_images.folder(pipeline_store),
        pipeline_store.asset_dir(MAKER_PREDICTIONS, key),
        model_name=champion.name,
        model_version=version,
    )
    pipeline_store.write_manifest(MAKER_PREDICTIONS, batch.to_json(), partition=key)
    table = batch.table
    failed = table[table["error"].notna()]
    counts = table["maker"].value_counts().rename_axis("maker").reset_index(name="images")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(batch.path),
            "folder": dg.MetadataValue.path(batch.folder),
            "folder_fingerprint": batch.fingerprint,
            "num_files": batch.files,
            "num_classified": batch.files - batch.unreadable,
            "num_unreadable": batch.unreadable,
            "model": f"{champion.name} v{version} (@champion)",
            "makers": typed_table(counts),
            # class, maker or unsure: how precisely the model could answer each image
            "levels": typed_table(table["level"].value_counts().rename_axis("level").reset_index(name="images")),
            "unreadable_files": typed_table(failed[["file_name", "error"]].reset_index(drop=True)),
        },
        data_version=content_version({"folder": batch.fingerprint, "model": champion.name, "version": version}),
    )


serving_assets = [merged_model, maker_predictions]
