"""Baseline: every base model classifies the test split, constrained to the maker list."""

import dagster as dg
from pydantic import Field, model_validator

from car_maker_pipeline.data.tasks import MAKER, Task
from car_maker_pipeline.evaluation.settings import DEFAULT_DELTA, DEFAULT_PREFETCH, default_target_precision
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.orchestration.deployment import MODEL_STEP
from car_maker_pipeline.orchestration.metadata import evaluation_metadata, log_answer_policy
from car_maker_pipeline.orchestration.partitions import model_and_task
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource, VisionLanguageModels
from car_maker_pipeline.orchestration.run_history import run_status
from car_maker_pipeline.orchestration.versions import code_version, content_version
from car_maker_pipeline.store import BASELINE_EVALUATION, CAR_MAKER_DATASET


class EvaluationConfig(dg.Config):
    batch_size: int = Field(default=16, gt=0, description="Images per forward pass.")
    prepare_workers: int | None = Field(
        default=None,
        ge=0,
        description="Threads decoding and preparing batches ahead of the model; unset: chosen from the machine "
        "(0 without a GPU, where they were measured no faster). Changes no result.",
    )
    prefetch: int = Field(
        default=DEFAULT_PREFETCH,
        gt=0,
        description="Prepared batches that may wait for the model (memory: this many + 1 batches at a time).",
    )
    max_images: int | None = Field(
        default=None, gt=0, description="Evaluate only the first N images (recorded when used)."
    )
    split: str = Field(default="test", description="Split of car_maker_dataset to score.")
    system_prompt: str | None = Field(default=None, description="Unset: the task's own (data/tasks.py).")
    user_prompt: str | None = Field(
        default=None,
        description="Must contain {makers} (the makers; for the class task, the makers of its classes). "
        "Unset: the task's own.",
    )
    min_image_tokens: int | None = Field(default=None, description="Image-token budget: unset keeps the model's.")
    max_image_tokens: int | None = Field(default=None, description="Image-token budget: unset keeps the model's.")
    do_image_splitting: bool | None = Field(default=None, description="Tile large pictures; unset keeps the model's.")
    target_precision: float = Field(
        default_factory=default_target_precision,
        gt=0,
        le=1,
        description="Share of the answers (not 'unsure') that must be right on new images: the confidence threshold "
        "for it is certified on validation (Learn then Test), measured on test, and below it the registered model "
        "answers 'unsure'. In (0, 1]; 0.99 on real data, 0.95 on the demo profile.",
    )
    delta: float = Field(
        default=DEFAULT_DELTA,
        gt=0,
        lt=1,
        description="The chance that the precision promise fails: it holds with probability at least 1 - delta "
        "over the validation images drawn. In (0, 1).",
    )

    @model_validator(mode="after")
    def _prompt_and_budget_are_usable(self):
        # PromptError / ImageTokenBudgetError (ValueErrors): rejected as the run's config is read.
        self.prompt()
        self.budget()
        return self

    def prompt(self, task: Task = MAKER) -> PromptTemplate:
        """The prompt for `task`: what this config sets, the task's own prompt for what it leaves unset."""
        return PromptTemplate(
            system=self.system_prompt or task.system_prompt, user=self.user_prompt or task.user_prompt
        )

    def budget(self) -> ImageTokenBudget:
        return ImageTokenBudget(self.min_image_tokens, self.max_image_tokens, self.do_image_splitting)


def evaluation_inputs(
    context: dg.AssetExecutionContext,
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
) -> dict:
    """The arguments every evaluation domain function takes: the store, where to record (MLflow is
    checked here, before any model work), a loader for the partition's base model, its model key and task."""
    from car_maker_pipeline.recording.baseline import RecordTarget

    pipeline_store = store.get()
    tracking_uri = mlflow_tracking.ensure_reachable(pipeline_store)
    run_status_here = run_status(context.instance, context.asset_key, str(context.partition_key))
    model_key, task = model_and_task(context.partition_key)
    return {
        "store": pipeline_store,
        "target": RecordTarget(tracking_uri, context.run_id, run_status_here),
        "load_model": lambda: models.load(model_key, pipeline_store),
        "model_key": model_key,
        "task": task,
    }


@dg.asset(
    name=BASELINE_EVALUATION,
    group_name="baseline",
    code_version=code_version(BASELINE_EVALUATION),
    deps=[CAR_MAKER_DATASET],
    kinds={"pytorch", "huggingface", "mlflow"},
    **MODEL_STEP,
    description=(
        "Each base model (one partition per model and task) classifies every test image. Answers are constrained "
        "to the maker list (the class task: the class names), so every image gets a valid answer; accuracy comes "
        "with a 95% Wilson interval. Predictions, per-answer table, figures and the answer policy go to MLflow; "
        "the class task adds implied maker accuracy and the hierarchical (class, maker, unsure) coverage table."
    ),
)
def baseline_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    # torch and transformers are imported here, not at module load: every Dagster step process
    # imports the definitions, and most steps never touch a model.
    from car_maker_pipeline.recording.baseline import evaluate_and_record

    inputs = evaluation_inputs(context, store, models, mlflow_tracking)
    key = str(context.partition_key)
    recorded = evaluate_and_record(
        **inputs,
        asset=BASELINE_EVALUATION,
        stage="baseline",
        prompt=config.prompt(inputs["task"]),
        batch_size=config.batch_size,
        prepare_workers=config.prepare_workers,
        prefetch=config.prefetch,
        split=config.split,
        max_images=config.max_images,
        budget=config.budget(),
        target_precision=config.target_precision,
        delta=config.delta,
    )
    context.log.info(f"{key} baseline: {recorded.report.describe()}")
    policy = recorded.calibration_report  # read from its file once
    if policy is not None:
        log_answer_policy(context, f"{key} baseline", policy)
    # Named by what decided the scores (model and dataset revisions, prompt, budget, split...), not by the run.
    return dg.MaterializeResult(
        metadata={
            **evaluation_metadata(recorded),
            **mlflow_tracking.links(inputs["target"].tracking_uri, run_id=recorded.mlflow_run_id),
        },
        data_version=content_version(recorded.params),
    )


baseline_assets = [baseline_evaluation]
