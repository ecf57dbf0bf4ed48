"""Dagster metadata for the evaluation assets: percentages in markdown tables, PNG figures inline.

Formatting only; what is scored and recorded lives in `car_maker_pipeline.evaluation`. Shared by
`baseline_evaluation` and `checkpoint_accuracy`, so both show their results the same way.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # the evaluation modules import torch; step processes that only load definitions should not
    import pandas as pd

    from car_maker_pipeline.evaluation.checkpoint_recording import CheckpointRecord
    from car_maker_pipeline.evaluation.recording import RecordedEvaluation


def image_markdown(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG inline in the Dagster UI (metadata has no image type; markdown with a data URI renders)."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def percent_markdown(table: pd.DataFrame, columns: tuple[str, ...], signed: tuple[str, ...] = ()) -> dg.MetadataValue:
    """`table` as markdown with `columns` as percentages (`signed` ones with a leading + or -)."""
    shown = table.copy()
    for column in columns:
        shown[column] = shown[column].map(("{:+.1%}" if column in signed else "{:.1%}").format)
    return dg.MetadataValue.md(shown.to_markdown(index=False))


def evaluation_metadata(recorded: RecordedEvaluation) -> dict:
    """One evaluated split: accuracy with its interval, speed, the per-maker table and the confusion matrix."""
    report = recorded.report
    metadata = {
        "accuracy": report.summary.accuracy,
        "accuracy_ci_low": report.summary.ci_low,
        "accuracy_ci_high": report.summary.ci_high,
        "macro_accuracy": report.summary.macro_accuracy,
        "num_images": report.summary.num_images,
        "images_per_second": report.images_per_second,
        "per_maker_accuracy": percent_markdown(report.per_maker(), ("accuracy", "ci_low", "ci_high")),
        "predictions": dg.MetadataValue.path(str(report.predictions_path)),
    }
    if report.confusion_path.exists():
        metadata["confusion_matrix"] = image_markdown(report.confusion_path, "confusion matrix")
    if report.sample_cap is not None:
        metadata["sample_cap"] = report.sample_cap
    metadata.update(report.throughput)  # image tokens per image, padded/real tokens, forward passes per image
    metadata["image_token_budget"] = dg.MetadataValue.json(
        {key: recorded.params.get(key) for key in ("image_min_tokens", "image_max_tokens", "image_splitting")}
    )
    return {**metadata, "mlflow_run_id": recorded.mlflow_run_id, "model_revision": recorded.params["model_revision"]}


def checkpoint_metadata(record: CheckpointRecord) -> dict:
    """A LoRA run's checkpoints: accuracy by step (table and chart), the best one and its registered version."""
    metadata = {
        "accuracy_by_step": percent_markdown(
            record.scores.table,
            ("val_accuracy", "accuracy", "ci_low", "ci_high", "macro_accuracy", "change_vs_baseline"),
            signed=("change_vs_baseline",),
        ),
        "accuracy_chart": image_markdown(record.chart_path, "accuracy by step"),
        "best_step": record.best_step,
        "best_test_accuracy": record.best_test_accuracy,
        "best_val_accuracy": record.best_val_accuracy,
        "baseline_accuracy": record.baseline_accuracy,
        "registered_model": f"{record.registered_model} v{record.registered_version}",
        # the models:/ URI, the champion decision and both validation accuracies it compared
        **(record.registration.metadata() if record.registration is not None else {}),
        "mlflow_run_id": record.mlflow_run_id,
        "table": dg.MetadataValue.path(str(record.table_path)),
    }
    if not record.scores.robustness.empty:
        metadata["accuracy_by_corruption"] = dg.MetadataValue.md(
            record.scores.robustness.to_markdown(index=False, floatfmt=".3f")
        )
    return metadata


def checkpoint_observations(record: CheckpointRecord, asset: str, partition: str) -> list[dg.AssetObservation]:
    """One observation per checkpoint, so the UI plots test and validation accuracy against step."""
    return [
        dg.AssetObservation(
            asset_key=asset,
            partition=partition,
            metadata={
                "step": int(row.step),
                "test_accuracy": float(row.accuracy),
                "val_accuracy": float(row.val_accuracy),
            },
        )
        for row in record.scores.table.itertuples()
    ]
