"""The evaluation step shared by `baseline_evaluation` and `checkpoint_accuracy`: score, record, report."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg

from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.store import PipelineStore
from car_maker_pipeline.tracking import mlflow_run, scrub_secrets


def image_markdown(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG inline in the Dagster UI (metadata has no image type; markdown with a data URI renders)."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def report_metadata(report) -> dict:
    table = report.per_maker().copy()
    for column in ("accuracy", "ci_low", "ci_high"):
        table[column] = table[column].map(lambda value: f"{value:.1%}")
    metadata = {
        "accuracy": report.summary.accuracy,
        "accuracy_ci_low": report.summary.ci_low,
        "accuracy_ci_high": report.summary.ci_high,
        "macro_accuracy": report.summary.macro_accuracy,
        "num_images": report.summary.num_images,
        "images_per_second": report.images_per_second,
        "per_maker_accuracy": dg.MetadataValue.md(table.to_markdown(index=False)),
        "predictions": dg.MetadataValue.path(str(report.predictions_path)),
    }
    if report.confusion_path.exists():
        metadata["confusion_matrix"] = image_markdown(report.confusion_path, "confusion matrix")
    if report.sample_cap is not None:
        metadata["sample_cap"] = report.sample_cap
    return metadata


def log_report(report, params: dict, artifact_dir: str | None = None) -> None:
    import mlflow

    mlflow.log_params(scrub_secrets(params))
    mlflow.log_metrics(report.metrics())
    for path in (report.predictions_path, report.per_maker_path, report.confusion_path, report.misclassified_path):
        if path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def evaluate_model(
    context,
    *,
    store: PipelineStore,
    uri: str,
    loaded,
    model_key: str,
    stage: str,
    out_dir: Path,
    prompt: PromptTemplate,
    batch_size: int,
    max_images: int | None,
    split: str,
    manifest: tuple[str, str],
    extra_params: dict | None = None,
) -> dg.MaterializeResult:
    # torch and transformers are imported here, not at module load: every Dagster step process
    # imports the definitions, and most steps never touch a model.
    from car_maker_pipeline.evaluation.classifier import MakerClassifier
    from car_maker_pipeline.evaluation.runner import evaluate_to_dir

    makers_record = store.maker_dataset()
    dataset = makers_record.load()
    if split not in dataset:
        raise ValueError(f"car_maker_dataset has no split {split!r}; it has {list(dataset)}.")
    classifier = MakerClassifier(
        loaded.model, loaded.processor, makers_record.makers, prompt=prompt, batch_size=batch_size
    )
    report = evaluate_to_dir(
        classifier, dataset, split, out_dir / context.run_id, title=f"{model_key} {stage}", max_images=max_images
    )
    params = {
        "model_key": model_key,
        "model_id": loaded.path_or_id,
        "model_revision": loaded.revision,
        "dataset_revision": makers_record.source_revision,
        "dataset_path": Path(makers_record.path).name,
        "prompt_hash": classifier.prompt_hash,
        "num_images": report.summary.num_images,
        "batch_size": batch_size,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "split": split,
        "sample_cap": max_images,
        **(extra_params or {}),
    }
    tags = {"dagster_run_id": context.run_id, "model_key": model_key, "stage": stage}
    with mlflow_run(uri, store.root, run_name=f"{stage}-{model_key}", tags=tags, orphans_of=context.instance) as run:
        log_report(report, params)
    store.write_manifest(
        manifest[0], {**report.to_json(), "mlflow_run_id": run.info.run_id, "params": params}, partition=manifest[1]
    )
    context.log.info(
        f"{model_key} {stage}: {report.summary.accuracy:.1%} [{report.summary.ci_low:.1%}, {report.summary.ci_high:.1%}] "
        f"on {report.summary.num_images} images at {report.images_per_second:.1f} images/s"
    )
    return dg.MaterializeResult(
        metadata={**report_metadata(report), "mlflow_run_id": run.info.run_id, "model_revision": loaded.revision}
    )
