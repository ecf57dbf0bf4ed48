"""Recording an evaluation: its MLflow run (tags, params, metrics, artifacts) and the asset's manifest.

Both evaluation assets record the same way: one MLflow run in the pipeline's experiment, tagged with
the Dagster run, the model and the stage, opened only after the run a killed process left behind is
deleted; parameters pass through `scrub_secrets`; the manifest is written last, naming the run.
Plain Python (no Dagster): the assets pass the Dagster run id and instance in a `RecordTarget`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.data.tasks import MAKER, Task, dataset_answers
from car_maker_pipeline.evaluation.answer_policy import CalibrationFiles, CalibrationReport
from car_maker_pipeline.evaluation.class_task import ClassTaskFiles, ClassTaskReport, assess_answers
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError
from car_maker_pipeline.evaluation.metrics.certification import check_delta
from car_maker_pipeline.evaluation.metrics.selective import check_target_precision
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier
from car_maker_pipeline.evaluation.settings import (
    CALIBRATION_SPLIT,
    DEFAULT_DELTA,
    DEFAULT_PREFETCH,
    DEFAULT_TARGET_PRECISION,
)
from car_maker_pipeline.evaluation.split_report import EvaluationReport, evaluate_to_dir
from car_maker_pipeline.evaluation.validation_folds import fold_keys
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.loading import LoadedModel
from car_maker_pipeline.store import PipelineStore
from car_maker_pipeline.tracking import mlflow_run, scrub_secrets


def check_calibration_split(makers, split: str = CALIBRATION_SPLIT) -> None:
    """Refuse, before any model work, a split that cannot fit a temperature: it needs two makers."""
    present = sorted(set(makers))
    if len(present) < 2:
        raise CalibrationError(
            f"The {split} split holds {len(present)} maker(s) ({present}); a temperature fitted on it would say "
            f"nothing about telling makers apart. Rebuild car_maker_dataset so that {split} holds at least two makers."
        )


@dataclass(frozen=True)
class RecordTarget:
    """Where an evaluation is recorded, and on behalf of which orchestrator run.

    `dagster_run_id` tags the MLflow run (and names the folder of a baseline's results).
    `run_status`, when given, says what the orchestrator knows of the Dagster run that wrote an earlier
    MLflow run with the same tags (`tracking.delete_orphaned_runs`): one its step left behind without
    materializing (killed, or failed after logging) is deleted before recording, so a re-executed step
    does not leave two records.
    """

    tracking_uri: str
    dagster_run_id: str
    run_status: Callable[[str | None], str] | None = None


@contextmanager
def evaluation_run(
    target: RecordTarget, store: PipelineStore, run_name: str, model_key: str, stage: str, **tags: str
) -> Iterator:
    """The MLflow run of one evaluation, active inside the block: open while the model scores, so its
    system metrics (CPU, memory, GPU) show whether the accelerator was kept busy."""
    with mlflow_run(
        target.tracking_uri,
        store.root,
        run_name=run_name,
        tags={"dagster_run_id": target.dagster_run_id, "model_key": model_key, "stage": stage, **tags},
        status_of=target.run_status,
        system_metrics=True,
    ) as run:
        yield run


def budget_params(budget: ImageTokenBudget) -> dict:
    """The image-token budget in force, as flat MLflow params (`image_min_tokens`, ...)."""
    return {
        "image_min_tokens": budget.min_image_tokens,
        "image_max_tokens": budget.max_image_tokens,
        "image_splitting": budget.do_image_splitting,
    }


def log_params(params: dict) -> None:
    mlflow.log_params(scrub_secrets(params))


def log_report(report: EvaluationReport) -> None:
    """An evaluated split's metrics and its files (predictions, per-maker table, figures that were drawn)."""
    mlflow.log_metrics(report.metrics())
    for path in (report.predictions_path, report.per_maker_path, report.confusion_path, report.misclassified_path):
        if path.exists():
            mlflow.log_artifact(str(path))


def record_answer_policy(
    files: CalibrationFiles | ClassTaskFiles,
    prefix: str = "",
    *,
    metrics: bool = True,
    artifact_path: str | None = None,
) -> None:
    """An answer policy in the active MLflow run: its numbers and what it promises in words (the `certification`
    tag, with the method and the temperature's fate; skipped with `metrics=False`), and its files under
    `artifact_path` (default: the policy's kind, `calibration` or `class_task`). The maker task's calibration
    and the class task's hierarchical report are recorded alike."""
    if metrics:
        report = files.report()
        mlflow.log_metrics(report.metrics(prefix))
        mlflow.set_tags(
            {
                f"{prefix}certification": report.statement,
                f"{prefix}certification_method": report.method,
                f"{prefix}temperature_refused": report.temperature_refused or "no",
            }
        )
    for path in files.artifact_paths():
        mlflow.log_artifact(str(path), artifact_path=artifact_path or files.kind)


@dataclass
class RecordedEvaluation:
    report: EvaluationReport
    params: dict
    mlflow_run_id: str
    # The task's answer policy (the maker task's calibration, or the class task's hierarchical report);
    # None when there is no validation split to fit it on.
    policy: CalibrationFiles | ClassTaskFiles | None = None

    @property
    def calibration_report(self) -> CalibrationReport | ClassTaskReport | None:
        return self.policy.report() if self.policy is not None else None


def evaluate_and_record(
    store: PipelineStore,
    target: RecordTarget,
    load_model: Callable[[], LoadedModel],
    *,
    asset: str,
    model_key: str,
    stage: str,
    prompt: PromptTemplate | None = None,
    batch_size: int,
    split: str,
    prepare_workers: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    max_images: int | None = None,
    budget: ImageTokenBudget | None = None,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    delta: float = DEFAULT_DELTA,
    task: Task = MAKER,
) -> RecordedEvaluation:
    """Score one split of the current maker dataset for `task`, record it in MLflow, then write the manifest of
    `asset`'s partition (results under `<asset>/<task.partition(model_key)>/<dagster run id>`).

    The validation split is scored too (`<run id>-validation`), to fit the temperature and certify the
    confidence threshold(s) for `target_precision` at `delta` that are then measured on `split`
    (`<run id>-calibration`, or `<run id>-class_task` with the hierarchical report). `prompt`: None is the
    task's own; for the class task its `{makers}` lists the classes' makers. `load_model` is called only once
    the dataset and split are known to exist, so a missing input fails before any model is built or loaded.
    """
    check_target_precision(target_precision)
    check_delta(delta)
    makers_record = MakerDataset.current(store)
    dataset = makers_record.load()
    if split not in dataset:
        raise ValueError(
            f"car_maker_dataset has no split {split!r}; it has {list(dataset)}. Set `split` to one of those."
        )
    answers = dataset_answers(task, makers_record.makers, dataset)
    prompt = task.prompt(answers, prompt.system, prompt.user) if prompt is not None else task.prompt(answers)
    calibrate_on = CALIBRATION_SPLIT if CALIBRATION_SPLIT in dataset and split != CALIBRATION_SPLIT else None
    if calibrate_on is not None:
        check_calibration_split(dataset[calibrate_on]["maker"], calibrate_on)
    loaded = load_model()
    classifier = MakerClassifier(
        loaded.model,
        loaded.processor,
        answers,
        prompt=prompt,
        batch_size=batch_size,
        budget=budget,
        workers=prepare_workers,
        prefetch=prefetch,
    )
    partition = task.partition(model_key)
    out_dir = store.asset_dir(asset, partition) / target.dagster_run_id
    with evaluation_run(target, store, f"{stage}-{partition}", partition, stage) as run:
        report = evaluate_to_dir(
            classifier, dataset, split, out_dir, title=f"{partition} {stage}", max_images=max_images, task=task
        )
        policy = None
        if calibrate_on is not None:
            validation = evaluate_to_dir(
                classifier,
                dataset,
                calibrate_on,
                out_dir.with_name(f"{out_dir.name}-{calibrate_on}"),
                "",
                figures=False,
                task=task,
            )
            val_predictions = validation.predictions()
            assessed = assess_answers(
                task,
                val_predictions,
                report.predictions(),
                answers,
                target_precision,
                delta=delta,
                fold_keys=fold_keys(dataset[calibrate_on], val_predictions),
            )
            policy = assessed.write(out_dir.with_name(f"{out_dir.name}-{assessed.kind}"), f"{partition} {stage}")
        params = {
            "model_key": model_key,
            "task": task.name,
            "model_id": loaded.path_or_id,
            "model_revision": loaded.revision,
            "dataset_revision": makers_record.source_revision,
            "dataset_path": Path(makers_record.path).name,
            "prompt_hash": classifier.prompt_hash,
            "num_images": report.summary.num_images,
            "num_answers": len(answers),
            "batch_size": batch_size,
            "device": loaded.device,
            "dtype": loaded.dtype,
            "split": split,
            "sample_cap": max_images,
            "target_precision": target_precision,
            "delta": delta,
            "calibration_split": calibrate_on,
            **budget_params(classifier.budget),
        }
        log_params(params)
        log_report(report)
        if policy is not None:
            record_answer_policy(policy)
    policy_json = {"calibration": policy.report().to_json()} if policy is not None else {}
    store.write_manifest(
        asset,
        {**report.to_json(), **policy_json, "task": task.name, "mlflow_run_id": run.info.run_id, "params": params},
        partition=partition,
    )
    return RecordedEvaluation(report, params, run.info.run_id, policy)
