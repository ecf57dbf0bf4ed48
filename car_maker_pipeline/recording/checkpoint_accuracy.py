"""Score every checkpoint of a model's LoRA run and record the result: table and chart, MLflow run,
the best adapter registered with its card, and the `checkpoint_accuracy` manifest.

Plain Python (no Dagster): the asset resolves the store, tracking target and base model, calls
`evaluate_checkpoints_and_record` and turns the returned `CheckpointRecord` into metadata. The
names recorded here (MLflow params, metrics, artifacts, registry tags, manifest fields) are what the
README, `classify` and the demo summary read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.data.tasks import MAKER, Task, check_same_task, dataset_answers
from car_maker_pipeline.evaluation.answer_policy import (
    CalibrationFiles,
    CalibrationReport,
)
from car_maker_pipeline.evaluation.checkpoint_scores import (
    VALIDATION,
    CheckpointEvaluationError,
    CheckpointScores,
    accuracy_chart,
    score_checkpoints,
)
from car_maker_pipeline.evaluation.class_task import ClassTaskFiles, ClassTaskReport
from car_maker_pipeline.evaluation.metrics.certification import check_delta
from car_maker_pipeline.evaluation.metrics.figures import save_figure
from car_maker_pipeline.evaluation.metrics.selective import check_target_precision
from car_maker_pipeline.evaluation.settings import (
    DEFAULT_DELTA,
    DEFAULT_PREFETCH,
    DEFAULT_SELECTION_METRIC,
    DEFAULT_TARGET_PRECISION,
    SELECTION_METRICS,
)
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget, budget_for_checkpoint
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.checkpoint_marker import ADAPTER_WEIGHTS, recorded_digest, verified_checkpoints
from car_maker_pipeline.models.loading import LoadedModel
from car_maker_pipeline.recording.aliases import RegisteredClassifier, promote
from car_maker_pipeline.recording.baseline import (
    RecordTarget,
    budget_params,
    check_calibration_split,
    evaluation_run,
    log_params,
    record_answer_policy,
)
from car_maker_pipeline.recording.registry import Candidate, register_classifier, registered_name
from car_maker_pipeline.store import BASELINE_EVALUATION, CHECKPOINT_ACCURACY, LORA_CHECKPOINTS, PipelineStore

logger = logging.getLogger(__name__)

STAGE = "checkpoint_accuracy"  # the MLflow `stage` tag of these runs


@dataclass(frozen=True)
class CheckpointRecord:
    scores: CheckpointScores
    baseline_accuracy: float
    table_path: Path
    chart_path: Path
    registered_model: str
    registered_version: str
    mlflow_run_id: str
    registration: RegisteredClassifier | None = None  # the version, its aliases and the champion decision
    calibration: CalibrationFiles | ClassTaskFiles | None = None  # the best checkpoint's policy, with its charts
    baseline_calibration: dict | None = None  # the baseline's policy report (to_json()), when it has one

    @property
    def best_calibration(self) -> CalibrationReport | ClassTaskReport:
        """The chosen checkpoint's answer policy: the maker task's calibration, or the class task's report."""
        return self.scores.calibrations[self.best_step].report

    @property
    def best_adapter_digest(self) -> str:
        """sha256 of the chosen checkpoint's adapter weights, as its completion marker records it."""
        return recorded_digest(self.scores.best_checkpoint, ADAPTER_WEIGHTS)

    @property
    def best_step(self) -> int:
        return self.scores.best_step

    @property
    def best_test_accuracy(self) -> float:
        return float(self.scores.best["accuracy"])

    @property
    def best_val_accuracy(self) -> float:
        return float(self.scores.best["val_accuracy"])

    @property
    def beats_baseline(self) -> bool:
        return self.best_test_accuracy > self.baseline_accuracy


def listed_checkpoints(training: dict, warn: Callable[[str], None] = logger.warning) -> dict[int, Path]:
    """The checkpoints the `lora_checkpoints` manifest lists, by optimizer step, that still verify.

    A checkpoint whose files changed after training marked it complete (their sha256 no longer
    match its marker) is left out with a warning: it is never scored or registered. Training
    quarantines and retrains it the next time `lora_checkpoints` is materialized.
    """
    listed = {int(step): Path(path) for step, path in training["checkpoints"].items()}
    usable, rejected = verified_checkpoints(listed)
    for step, problems in rejected.items():
        warn(
            f"checkpoint-{step} is not scored ({'; '.join(problems)}); materialize lora_checkpoints again "
            "to quarantine and retrain it."
        )
    return usable


def evaluate_checkpoints_and_record(
    store: PipelineStore,
    target: RecordTarget,
    load_model: Callable[[], LoadedModel],
    *,
    model_key: str,
    prompt: PromptTemplate | None = None,
    batch_size: int,
    prepare_workers: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    robustness: bool = True,
    budget: ImageTokenBudget | None = None,
    warn: Callable[[str], None] = logger.warning,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    selection_metric: str = DEFAULT_SELECTION_METRIC,
    delta: float = DEFAULT_DELTA,
    task: Task = MAKER,
) -> CheckpointRecord:
    """Score the checkpoints of `model_key`'s current LoRA run against its baseline (new ones only;
    earlier scores are reused), choose the best on validation, and record and register it.

    `load_model` gives the run's base model; it is called only after every input (training and
    baseline manifests, maker dataset) is found, so a missing one fails before any model work. Each
    checkpoint's adapter is attached to the base model in turn. With `robustness`, the baseline and
    the best checkpoint are also scored on each corrupted copy of test. The registered card carries the
    chosen checkpoint's temperature, certified threshold, delta and what they promise in words; the class
    task's card carries both hierarchical thresholds and is registered as `car-class-<model_key>`.
    `prompt`: None is the task's own.
    """
    check_target_precision(target_precision)
    check_delta(delta)
    if selection_metric not in SELECTION_METRICS:
        raise ValueError(f"Unknown selection metric {selection_metric!r}; use one of {', '.join(SELECTION_METRICS)}.")
    partition = task.partition(model_key)
    training = store.read_manifest(LORA_CHECKPOINTS, partition)
    baseline = store.read_manifest(BASELINE_EVALUATION, partition)
    check_same_task(training.get("task", MAKER.name), task.name, f"{partition}'s LoRA run")
    check_same_task(baseline.get("task", MAKER.name), task.name, f"{partition}'s baseline_evaluation")
    baseline_accuracy = baseline["summary"]["accuracy"]
    dataset_record = MakerDataset.current(store)
    dataset = dataset_record.load()
    answers = dataset_answers(task, dataset_record.makers, dataset)
    check_same_makers(training.get("makers"), answers, partition)
    check_calibration_split(dataset[VALIDATION]["maker"])
    checkpoints = listed_checkpoints(training, warn)
    out_root = store.asset_dir(CHECKPOINT_ACCURACY, partition) / Path(training["output_dir"]).name
    prompt = task.prompt(answers, prompt.system, prompt.user) if prompt is not None else task.prompt(answers)
    budget, mismatch = budget_for_checkpoint(training.get("image_token_budget"), budget or ImageTokenBudget())
    if mismatch:
        warn(mismatch)
    loaded = load_model()
    run_name, training_run = f"checkpoints-{partition}", training["mlflow_run_id"]
    with evaluation_run(target, store, run_name, partition, STAGE, training_run_id=training_run) as run:
        scores = score_checkpoints(
            loaded.model,
            loaded.processor,
            checkpoints,
            dataset,
            answers,
            out_root,
            baseline_accuracy=baseline_accuracy,
            val_loss={int(step): loss for step, loss in training["val_loss"]},
            prompt=prompt,
            batch_size=batch_size,
            prepare_workers=prepare_workers,
            prefetch=prefetch,
            corrupted_splits=dataset_record.corrupted_splits if robustness else [],
            budget=budget,
            target_precision=target_precision,
            selection_metric=selection_metric,
            delta=delta,
            task=task,
        )
        in_force = ImageTokenBudget.of(loaded.processor)
        table_path = out_root / "checkpoint_accuracy.parquet"
        scores.table.to_parquet(table_path, index=False)
        chart_path = save_figure(
            accuracy_chart(scores.table, baseline_accuracy, f"{partition}: accuracy by checkpoint"),
            out_root / "accuracy_by_step.png",
        )
        best = scores.best
        name = registered_name(model_key, task)
        # Every checkpoint's reliability diagram and risk-coverage curve (the class task: its hierarchical report),
        # for MLflow; the best one's in the metadata.
        step_calibrations = {
            step: policy.write(out_root / f"{policy.kind}-step-{step}", f"{partition} step {step}")
            for step, policy in scores.calibrations.items()
        }
        calibration = step_calibrations[scores.best_step]
        calibrated = calibration.report()

        log_params(
            {
                "model_key": model_key,
                "task": task.name,
                "base_model": training["base_model"],
                "base_model_revision": loaded.revision,
                "prompt_hash": prompt.fingerprint(answers),
                "num_checkpoints": len(checkpoints),
                "best_step": scores.best_step,
                "selection": SELECTION_METRICS[selection_metric],
                "target_precision": target_precision,
                "delta": delta,
                **budget_params(in_force),
            }
        )
        _log_scores(scores, baseline_accuracy, model_key, table_path, chart_path)
        record_answer_policy(calibration, prefix="best_")
        for step, files in step_calibrations.items():
            record_answer_policy(files, metrics=False, artifact_path=f"calibration/step-{step}")
        registered = register_classifier(
            Candidate.of_checkpoint(
                model_key,
                scores.best_checkpoint,
                loaded,
                answers,
                prompt,
                step=scores.best_step,
                val_accuracy=best["val_accuracy"],
                test_accuracy=best["accuracy"],
                **calibrated.card_fields(),
            ),
            uri=target.tracking_uri,
            home=store.root,
            dataset_record=dataset_record,
            tags={"dagster_run_id": target.dagster_run_id, **budget_params(in_force)},
        )
    # The run has ended FINISHED: only now may an alias name its version (never a failed or deleted run's).
    registration = promote(registered, uri=target.tracking_uri, home=store.root)
    version = registration.version

    store.write_manifest(
        CHECKPOINT_ACCURACY,
        {
            "table": str(table_path),
            "best_step": scores.best_step,
            "best_checkpoint": str(scores.best_checkpoint),
            "registered_version": version,
            "mlflow_run_id": run.info.run_id,
            "robustness": scores.robustness.to_dict("records"),
            "baseline_accuracy": baseline_accuracy,
            "calibration": calibrated.to_json(),
            "baseline_calibration": baseline.get("calibration"),
            "task": task.name,
        },
        partition=partition,
    )
    return CheckpointRecord(
        scores,
        baseline_accuracy,
        table_path,
        chart_path,
        name,
        version,
        run.info.run_id,
        registration,
        calibration,
        baseline.get("calibration"),
    )


def check_same_makers(trained_on: list[str] | None, makers: list[str], model_key: str) -> None:
    """A LoRA run trained on another answer list (makers, or the class task's classes) cannot be scored on this
    dataset: say so before model work."""
    if trained_on is not None and list(trained_on) != list(makers):
        missing, extra = sorted(set(makers) - set(trained_on)), sorted(set(trained_on) - set(makers))
        raise CheckpointEvaluationError(
            f"{model_key}'s LoRA run was trained on {len(trained_on)} answers and car_maker_dataset now has "
            f"{len(makers)} (only in the dataset: {missing or 'none'}; only in training: {extra or 'none'}"
            f"{'; same makers, another order' if not missing and not extra else ''}). "
            f"Materialize lora_checkpoints for {model_key} again on this dataset, then checkpoint_accuracy."
        )


def _log_scores(
    scores: CheckpointScores, baseline_accuracy: float, model_key: str, table_path: Path, chart_path: Path
) -> None:
    """Per-step accuracies as metric histories, the best and the baseline as single values, the tables and chart."""
    for row in scores.table.itertuples():
        mlflow.log_metrics(
            {
                "val_accuracy": row.val_accuracy,
                "test_accuracy": row.accuracy,
                "test_ci_low": row.ci_low,
                "test_ci_high": row.ci_high,
                "test_macro_accuracy": row.macro_accuracy,
                # top-3 of the makers, or top-5 of the classes
                **{
                    f"test_{name}": getattr(row, name)
                    for name in ("top3_accuracy", "top5_accuracy")
                    if hasattr(row, name)
                },
                "test_log_loss": row.log_loss,
                "test_ece": row.ece,
                "test_ece_calibrated": row.ece_calibrated,
                "val_coverage_at_target": row.val_coverage_at_target,
                "test_coverage_at_target": row.coverage_at_target,
                "best_certifiable_precision": row.best_certifiable_precision,
            },
            step=int(row.step),
        )
    mlflow.log_metrics(
        {
            "best_test_accuracy": float(scores.best["accuracy"]),
            "best_val_accuracy": float(scores.best["val_accuracy"]),
            "baseline_test_accuracy": baseline_accuracy,
        }
    )
    mlflow.log_table(scores.table, artifact_file=f"checkpoint_accuracy_{model_key}.json")
    if not scores.robustness.empty:
        mlflow.log_table(scores.robustness, artifact_file=f"robustness_{model_key}.json")
    mlflow.log_artifact(str(chart_path))
    mlflow.log_artifact(str(table_path))
