"""Dagster metadata for the evaluation assets: typed tables, calibration numbers, PNG figures inline.

Formatting only; what is scored and recorded lives in `car_maker_pipeline.evaluation`. Shared by
`baseline_evaluation` and `checkpoint_accuracy`, so both show their results the same way. Tables are
`MetadataValue.table` with a `TableSchema`, so the UI shows typed, sortable columns (fractions, not
formatted percentages); only pictures go through markdown, which has the one image form Dagster renders.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:  # the evaluation modules import torch; step processes that only load definitions should not
    import pandas as pd

    from car_maker_pipeline.recording.baseline import RecordedEvaluation
    from car_maker_pipeline.recording.checkpoint_accuracy import CheckpointRecord


# Pictures inline in the event log are small copies: every materialization's metadata is stored in the
# event log and sent to every browser that opens the asset, so it stays near 50 KB (the full-size
# PNGs are beside the results and in the MLflow run's artifacts).
THUMBNAIL_WIDTH = 400  # pixels: readable in the metadata panel
THUMBNAIL_COLOURS = 32  # a chart's flat colours survive a small palette; the file shrinks severalfold


def image_markdown(path: Path, alt: str) -> dg.MetadataValue:
    """A small copy of a PNG inline in the Dagster UI (metadata has no image type; markdown with a data URI
    renders), and where the full-size one is."""
    from PIL import Image

    with Image.open(path) as picture:
        picture.thumbnail((THUMBNAIL_WIDTH, 4 * THUMBNAIL_WIDTH))
        small = picture.convert("RGB").quantize(colors=THUMBNAIL_COLOURS)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})\n\nFull size: `{path}`")


RISK_COVERAGE_ROWS = 50  # a curve has a row per distinct confidence; the UI table shows an even sample


def _column_type(dtype) -> str:
    kind = getattr(dtype, "kind", "O")
    return {"b": "bool", "i": "int", "u": "int", "f": "float"}.get(kind, "string")


def _cell(value, kind: str):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return {"bool": bool, "int": int, "float": float}.get(kind, str)(value)


def typed_table(table: pd.DataFrame, descriptions: dict[str, str] | None = None) -> dg.MetadataValue:
    """`table` as a Dagster table with a schema built from its dtypes (NaN shown as empty)."""
    kinds = {str(name): _column_type(dtype) for name, dtype in table.dtypes.items()}
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name, kind, description=(descriptions or {}).get(name)) for name, kind in kinds.items()]
    )
    records = [
        dg.TableRecord({name: _cell(value, kinds[name]) for name, value in zip(kinds, row)})
        for row in table.itertuples(index=False)
    ]
    return dg.MetadataValue.table(records=records, schema=schema)


def risk_coverage_table(curve: pd.DataFrame) -> dg.MetadataValue:
    """The risk-coverage curve: accuracy on the answered images against the share answered."""
    if len(curve) > RISK_COVERAGE_ROWS:
        picks = sorted({round(i * (len(curve) - 1) / (RISK_COVERAGE_ROWS - 1)) for i in range(RISK_COVERAGE_ROWS)})
        curve = curve.iloc[picks]
    return typed_table(curve.reset_index(drop=True))


def log_answer_policy(context: dg.AssetExecutionContext, label: str, report) -> None:
    """The evaluation's answer policy in the run's log: a warning when the temperature fit was refused (and
    why), then what the threshold promises. `report`: an `evaluation.answer_policy.CalibrationReport`."""
    if report.temperature_refused:
        context.log.warning(f"{label}: temperature fit refused, T = 1 kept: {report.temperature_refused}.")
    context.log.info(f"{label}: {report.describe()}")


def calibration_metadata(calibration, prefix: str = "") -> dict:
    """Top-1/top-3, log loss and ECE before and after temperature, the certificate (in numbers and in words,
    with the method), coverage on test, and the charts. `calibration`: an `answer_policy.CalibrationFiles`.
    """
    report = calibration.report()
    metadata = {f"{prefix}{key}": value for key, value in report.metrics().items()}
    metadata[f"{prefix}certification"] = dg.MetadataValue.text(report.statement)
    metadata[f"{prefix}certification_method"] = dg.MetadataValue.text(report.method)
    metadata[f"{prefix}temperature_refused"] = dg.MetadataValue.text(report.temperature_refused or "no")
    metadata[f"{prefix}risk_coverage"] = risk_coverage_table(calibration.curve())
    metadata[f"{prefix}reliability_diagram"] = image_markdown(calibration.reliability_path, "reliability diagram")
    metadata[f"{prefix}risk_coverage_chart"] = image_markdown(calibration.risk_coverage_chart_path, "risk-coverage")
    return metadata


def class_task_metadata(files, prefix: str = "") -> dict:
    """The class task's report: class and implied maker accuracy, the hierarchical (class, maker, unsure) coverage
    table with each level's precision and Wilson interval, the certificate in words, per-class accuracy worst
    first, the most-confused pairs within a maker, and the climbing chart. `files`: a `class_task.ClassTaskFiles`."""
    from car_maker_pipeline.evaluation.class_task import CONFUSED_FILE, CURVE_CHART, LEVELS_FILE, PER_CLASS_FILE

    report = files.report()
    metadata = {f"{prefix}{key}": value for key, value in report.metrics().items() if not math.isnan(value)}
    metadata[f"{prefix}class_accuracy"] = report.top1_accuracy
    metadata[f"{prefix}hierarchical_coverage"] = typed_table(
        files.table(LEVELS_FILE),
        {"share": "share of test images answered at this level", "precision": "right answers at this level"},
    )
    metadata[f"{prefix}certification"] = dg.MetadataValue.text(report.statement)
    metadata[f"{prefix}certification_method"] = dg.MetadataValue.text(report.method)
    metadata[f"{prefix}temperature_refused"] = dg.MetadataValue.text(report.temperature_refused or "no")
    metadata[f"{prefix}per_class_accuracy"] = typed_table(files.table(PER_CLASS_FILE).head(RISK_COVERAGE_ROWS))
    metadata[f"{prefix}confused_within_maker"] = typed_table(files.table(CONFUSED_FILE))
    metadata[f"{prefix}hierarchical_risk_coverage_chart"] = image_markdown(files.path(CURVE_CHART), "climbing")
    return metadata


def policy_metadata(files, prefix: str = "") -> dict:
    """The task's answer policy: `calibration_metadata` of the maker task's `CalibrationFiles`, or
    `class_task_metadata` of the class task's `ClassTaskFiles`."""
    from car_maker_pipeline.evaluation.class_task import ClassTaskFiles

    return (class_task_metadata if isinstance(files, ClassTaskFiles) else calibration_metadata)(files, prefix)


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
        "per_maker_accuracy": typed_table(report.per_maker()),
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
    if recorded.policy is not None:
        metadata.update(policy_metadata(recorded.policy))
    return {**metadata, "mlflow_run_id": recorded.mlflow_run_id, "model_revision": recorded.params["model_revision"]}


def checkpoint_metadata(record: CheckpointRecord) -> dict:
    """A LoRA run's checkpoints: accuracy by step (table and chart), the best one and its registered version."""
    metadata = {
        "accuracy_by_step": typed_table(
            record.scores.table,
            {
                "accuracy": "test accuracy",
                "certified": "the target precision is certified on validation (Learn then Test)",
                "best_certifiable_precision": "the highest precision the validation images certify",
                "val_coverage_at_target": "certified coverage: share of the threshold fold answered",
                "coverage_at_target": "share of test answered with the threshold certified on validation",
                "selective_accuracy": "test accuracy on the answered images",
            },
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
    if record.calibration is not None:
        metadata.update(policy_metadata(record.calibration, prefix="best_"))
    for key, value in (record.baseline_calibration or {}).items():
        metadata[f"baseline_{key}"] = dg.MetadataValue.text(value) if isinstance(value, str) else value
    if not record.scores.robustness.empty:
        metadata["accuracy_by_corruption"] = typed_table(record.scores.robustness)
    return metadata


def checkpoint_observations(record: CheckpointRecord, asset: str, partition: str) -> list[dg.AssetObservation]:
    """One observation per checkpoint, so the UI plots accuracy, calibration and coverage against step."""
    observations = []
    for row in record.scores.table.itertuples():
        calibrated = record.scores.calibrations[int(row.step)].report
        observations.append(
            dg.AssetObservation(
                asset_key=asset,
                partition=partition,
                metadata={
                    "step": int(row.step),
                    "test_accuracy": float(row.accuracy),
                    "val_accuracy": float(row.val_accuracy),
                    **{key: value for key, value in calibrated.metrics().items() if not math.isnan(value)},
                },
            )
        )
    return observations
