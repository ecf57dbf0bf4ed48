"""Training and checkpoint evaluation: LoRA per model, then every checkpoint scored and the best registered."""

import json
import time
from pathlib import Path

import dagster as dg
from pydantic import Field, model_validator

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.orchestration.assets.baseline import BASELINE, EvaluationConfig
from car_maker_pipeline.orchestration.assets.data import MAKERS, stored_maker_dataset
from car_maker_pipeline.orchestration.deployment import GPU_OP_TAGS
from car_maker_pipeline.orchestration.evaluation import image_markdown
from car_maker_pipeline.orchestration.partitions import model_partitions
from car_maker_pipeline.orchestration.resources import MlflowTracking, PipelineStore, VisionLanguageModels
from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.tracking import (
    REGISTERED_MODEL_PREFIX,
    TrackingUnavailableError,
    experiment_id,
    find_run,
    mlflow_run,
    register_adapter,
    scrub_secrets,
)

TRAINING = "lora_checkpoints"
CHECKPOINT_ACCURACY = "checkpoint_accuracy"
RUN_ID_FILE = "mlflow_run.json"


class LoraConfig(dg.Config):
    """LoRA hyperparameters; defaults suit the tiny demo models on a CPU (see training/lora.py for real ones)."""

    learning_rate: float = Field(default=5e-3, gt=0, description="Peak learning rate (linear decay after warm-up).")
    max_steps: int = Field(default=400, gt=0, description="Optimizer steps.")
    per_device_train_batch_size: int = Field(default=32, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    lora_r: int = Field(default=8, gt=0)
    lora_alpha: int = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "fc1", "fc2", "linear_1", "linear_2"],
        description="Module-name suffixes to adapt (Liquid's LFM2-VL recipe by default). One that matches nothing is an error.",
    )
    checkpoint_every_n_steps: int = Field(
        default=50, gt=0, description="Save a checkpoint and compute validation loss every N steps."
    )
    seed: int = 0
    vision_lr_scale: float = Field(
        default=1.0, ge=0, description="Learning-rate multiplier for the vision tower's LoRA weights (Liquid: 0.1)."
    )
    gradient_checkpointing: bool = False
    num_processes: int = Field(
        default=1,
        ge=1,
        description="Training processes. Above 1: `accelerate launch` (DDP; gloo on CPU, NCCL on GPUs) through Dagster "
        "Pipes; the batch size is per process.",
    )

    @model_validator(mode="after")
    def _checkpoints_fit_in_the_run(self):
        # Checked when the run's config is read, before any data or model is touched.
        if self.checkpoint_every_n_steps > self.max_steps:
            raise ValueError(
                f"checkpoint_every_n_steps ({self.checkpoint_every_n_steps}) is larger than max_steps ({self.max_steps}): "
                "no intermediate checkpoint would be written. Lower it or train longer."
            )
        return self

    def to_training_config(self):
        from car_maker_pipeline.training.lora import LoraTrainingConfig

        return LoraTrainingConfig(**self.model_dump(exclude={"num_processes"}))

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:10]


def _training_dir(store: PipelineStore, key: str, config: LoraConfig, dataset: MakerDataset) -> Path:
    """Same model, data and hyperparameters -> same folder, so a rerun resumes instead of starting over."""
    return store.root / TRAINING / key / f"{Path(dataset.path).name}-{config.fingerprint()}"


def _train_distributed(
    context,
    num_processes: int,
    base: str,
    dataset_record: MakerDataset,
    out_dir: Path,
    training_config,
    run_id: str,
    uri: str,
):
    """`accelerate launch` over `num_processes` processes, through Dagster Pipes; rank 0 reports back."""
    import socket
    import sys

    from car_maker_pipeline.training.distributed import write_request
    from car_maker_pipeline.training.lora import LoraTrainingError, LoraTrainingResult
    from car_maker_pipeline.training.mlflow_callback import PENDING_FILE

    request = write_request(
        out_dir / "distributed_request.json",
        model_dir=base,
        dataset_path=dataset_record.path,
        makers=dataset_record.makers,
        output_dir=str(out_dir),
        config=training_config.to_json(),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        pending_path=str(out_dir / PENDING_FILE),
    )
    with socket.socket() as sock:  # a free loopback port for the process group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
        # accelerate's torchrun-based launcher; without CUDA the processes meet over gloo on the CPU
        # (its `--cpu` flag would instead need mpirun for more than one process).
        "--multi_gpu",
        "-m",
        "car_maker_pipeline.training.distributed",
        str(request),
    ]
    invocation = dg.PipesSubprocessClient().run(command=command, context=context)
    reports = [
        message for message in invocation.get_custom_messages() if isinstance(message, dict) and "result" in message
    ]
    if not reports:
        raise LoraTrainingError(
            f"The {num_processes}-process training ended without a result from rank 0; see the logs above."
        )
    return LoraTrainingResult.from_json(reports[-1]["result"]), int(reports[-1]["world_size"])


def _training_run_id(out_dir: Path, uri: str, home: Path, key: str, context, params: dict) -> str:
    """The MLflow run of this training folder: created once, then rejoined after a crash."""
    import mlflow

    marker = out_dir / RUN_ID_FILE
    if marker.exists():
        return json.loads(marker.read_text())["run_id"]
    exp = experiment_id(uri, home)
    tags = {"model_key": key, "stage": "training", "training_dir": out_dir.name}
    # Killed between creating the run and writing the marker: find the run by its folder instead.
    existing = find_run(uri, exp, tags)
    if existing is not None:
        write_json_atomic(marker, {"run_id": existing})
        return existing
    run = mlflow.MlflowClient(uri).create_run(
        exp, run_name=f"lora-{key}", tags={"dagster_run_id": context.run_id, **tags}
    )
    for name, value in scrub_secrets(params).items():
        mlflow.MlflowClient(uri).log_param(run.info.run_id, name, value)
    write_json_atomic(marker, {"run_id": run.info.run_id})
    return run.info.run_id


@dg.asset(
    name=TRAINING,
    group_name="training",
    owners=["team:ml-platform"],
    deps=[MAKERS],
    partitions_def=model_partitions,
    kinds={"pytorch", "huggingface", "mlflow"},
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    description=(
        "LoRA fine-tuning with TRL's SFTTrainer (one partition per model): loss on the answer tokens only, "
        "adapters on LFM2-VL's real projection layers, a checkpoint (adapter + processor) every N steps. "
        "Killed mid-run, the next materialization resumes from the last complete checkpoint in the same MLflow run."
    ),
)
def lora_checkpoints(
    context: dg.AssetExecutionContext,
    config: LoraConfig,
    store: PipelineStore,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    from car_maker_pipeline.training.lora import train_lora
    from car_maker_pipeline.training.mlflow_callback import PENDING_FILE, MlflowLossCallback

    key = context.partition_key
    training_config = config.to_training_config()  # invalid hyperparameters fail before anything loads
    uri = mlflow_tracking.ensure_reachable(store.root)
    dataset_record = stored_maker_dataset(store)
    dataset = dataset_record.load()
    base = models.path_or_id(key, store.root)
    out_dir = _training_dir(store, key, config, dataset_record)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {
        **training_config.to_json(),
        "target_modules": ",".join(config.target_modules),
        "model_key": key,
        "base_model": base,
        "dataset_revision": dataset_record.source_revision,
        "train_images": dataset["train"].num_rows,
        "num_processes": config.num_processes,
    }
    run_id = _training_run_id(out_dir, uri, store.root, key, context, params)
    losses = MlflowLossCallback(run_id, uri, pending_path=out_dir / PENDING_FILE)
    started = time.perf_counter()
    if config.num_processes > 1:
        result, world_size = _train_distributed(
            context, config.num_processes, base, dataset_record, out_dir, training_config, run_id, uri
        )
    else:
        result, world_size = (
            train_lora(
                base,
                dataset["train"],
                dataset["validation"],
                dataset_record.makers,
                out_dir,
                training_config,
                callbacks=[losses],
            ),
            1,
        )
    seconds = time.perf_counter() - started
    try:
        sent = losses.flush()  # what a tracking outage (in this run or a killed one) left buffered
    except Exception as error:
        raise TrackingUnavailableError(
            f"MLflow at {uri} stopped answering during training ({type(error).__name__}). Training finished and "
            f"its checkpoints are kept; {len(losses.pending_points())} loss points wait in {losses.pending_path}. "
            f"Bring the tracking server back and materialize lora_checkpoints for {key} again: it resumes at once "
            "and completes the MLflow record."
        ) from error
    if sent:
        context.log.warning(f"Sent {sent} loss points buffered while MLflow was unreachable.")
    with mlflow_run(uri, store.root, run_name=f"lora-{key}", tags={"dagster_run_id": context.run_id}, run_id=run_id):
        import mlflow

        mlflow.log_metrics({f"adapted_layers_{name}": count for name, count in result.adapted_layers.items()})
        mlflow.log_metric("global_step", result.global_step)
    manifest = {
        **result.to_json(),
        "mlflow_run_id": run_id,
        "base_model": base,
        "makers": dataset_record.makers,
        "dataset_path": dataset_record.path,
    }
    store.write_manifest(TRAINING, manifest, partition=key)
    samples = (
        (result.global_step - (int(result.resumed_from.name.split("-")[-1]) if result.resumed_from else 0))
        * config.per_device_train_batch_size
        * config.gradient_accumulation_steps
        * world_size
    )
    context.log.info(
        f"{key}: {result.global_step} steps, adapted layers {result.adapted_layers}, resumed from {result.resumed_from}"
    )
    return dg.MaterializeResult(
        metadata={
            "global_step": result.global_step,
            "training_processes": world_size,
            "checkpoints": dg.MetadataValue.json(sorted(result.checkpoints)),
            "adapted_layers": dg.MetadataValue.json(result.adapted_layers),
            "trainable_parameters": result.trainable_parameters,
            "final_train_loss": result.train_loss[-1][1] if result.train_loss else float("nan"),
            "final_val_loss": result.val_loss[-1][1] if result.val_loss else float("nan"),
            "resumed_from": str(result.resumed_from) if result.resumed_from else "",
            "train_seconds": result.train_seconds,
            "samples_per_second": samples / result.train_seconds if result.train_seconds > 0 else 0.0,
            "mlflow_run_id": run_id,
            "path": dg.MetadataValue.path(str(out_dir)),
            "wall_seconds": seconds,
        }
    )


class CheckpointEvaluationConfig(EvaluationConfig):
    robustness: bool = Field(
        default=True, description="Also score baseline and best checkpoint on each corrupted copy of test."
    )


@dg.asset(
    name=CHECKPOINT_ACCURACY,
    group_name="evaluation",
    owners=["team:ml-platform"],
    deps=[TRAINING, BASELINE],
    partitions_def=model_partitions,
    kinds={"pytorch", "mlflow"},
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            "best_checkpoint_beats_baseline",
            asset=CHECKPOINT_ACCURACY,
            description="The checkpoint chosen on validation beats its base model on test.",
        )
    ],
    description=(
        "Every checkpoint of a model's LoRA run scored on validation and test with the baseline's evaluator "
        "(new checkpoints only; earlier results are reused). The best checkpoint is chosen on validation "
        "accuracy and registered in the MLflow model registry; corrupted copies of test give a robustness table."
    ),
)
def checkpoint_accuracy(
    context: dg.AssetExecutionContext,
    config: CheckpointEvaluationConfig,
    store: PipelineStore,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
):
    import mlflow

    from car_maker_pipeline.evaluation.checkpoints import accuracy_chart, score_checkpoints
    from car_maker_pipeline.evaluation.reports import save_figure

    key = context.partition_key
    prompt = config.prompt()
    uri = mlflow_tracking.ensure_reachable(store.root)
    training = store.read_manifest(TRAINING, key)
    baseline = store.read_manifest(BASELINE, key)
    baseline_accuracy = baseline["summary"]["accuracy"]
    dataset_record = stored_maker_dataset(store)
    dataset = dataset_record.load()
    checkpoints = {int(step): Path(path) for step, path in training["checkpoints"].items()}
    loaded = models.load(key, store.root)
    out_root = store.root / CHECKPOINT_ACCURACY / key / Path(training["output_dir"]).name
    scores = score_checkpoints(
        loaded.model,
        loaded.processor,
        checkpoints,
        dataset,
        dataset_record.makers,
        out_root,
        baseline_accuracy=baseline_accuracy,
        val_loss={int(step): loss for step, loss in training["val_loss"]},
        prompt=prompt,
        batch_size=config.batch_size,
        corrupted_splits=dataset_record.corrupted_splits if config.robustness else [],
    )
    table_path = out_root / "checkpoint_accuracy.parquet"
    scores.table.to_parquet(table_path, index=False)
    chart_path = save_figure(
        accuracy_chart(scores.table, baseline_accuracy, f"{key}: accuracy by checkpoint"),
        out_root / "accuracy_by_step.png",
    )
    best = scores.table.set_index("step").loc[scores.best_step]

    with mlflow_run(
        uri,
        store.root,
        run_name=f"checkpoints-{key}",
        tags={
            "dagster_run_id": context.run_id,
            "model_key": key,
            "stage": "checkpoint_accuracy",
            "training_run_id": training["mlflow_run_id"],
        },
        orphans_of=context.instance,
    ) as run:
        mlflow.log_params(
            {
                "model_key": key,
                "base_model": training["base_model"],
                "base_model_revision": loaded.revision,
                "prompt_hash": prompt.fingerprint(dataset_record.makers),
                "num_checkpoints": len(checkpoints),
                "best_step": scores.best_step,
                "selection": "validation accuracy",
            }
        )
        for row in scores.table.itertuples():
            mlflow.log_metrics(
                {
                    "val_accuracy": row.val_accuracy,
                    "test_accuracy": row.accuracy,
                    "test_ci_low": row.ci_low,
                    "test_ci_high": row.ci_high,
                    "test_macro_accuracy": row.macro_accuracy,
                },
                step=int(row.step),
            )
        mlflow.log_metrics(
            {
                "best_test_accuracy": float(best["accuracy"]),
                "best_val_accuracy": float(best["val_accuracy"]),
                "baseline_test_accuracy": baseline_accuracy,
            }
        )
        mlflow.log_table(scores.table, artifact_file=f"checkpoint_accuracy_{key}.json")
        if not scores.robustness.empty:
            mlflow.log_table(scores.robustness, artifact_file=f"robustness_{key}.json")
        mlflow.log_artifact(str(chart_path))
        mlflow.log_artifact(str(table_path))
        # What the classify command needs besides the adapter: the maker list and the base model.
        card = out_root / "car_maker.json"
        write_json_atomic(
            card,
            {
                "makers": dataset_record.makers,
                "base_model": training["base_model"],
                "base_model_revision": loaded.revision,
                "step": scores.best_step,
            },
        )
        for path in (
            scores.best_checkpoint / "adapter_model.safetensors",
            scores.best_checkpoint / "adapter_config.json",
            card,
        ):
            mlflow.log_artifact(str(path), artifact_path="best_adapter")
        version = register_adapter(
            uri,
            run.info.run_id,
            mlflow.get_artifact_uri("best_adapter"),
            f"{REGISTERED_MODEL_PREFIX}{key}",
            {
                "base_model_id": training["base_model"],
                "base_model_revision": loaded.revision,
                "step": scores.best_step,
                "val_accuracy": f"{best['val_accuracy']:.4f}",
                "test_accuracy": f"{best['accuracy']:.4f}",
                "dagster_run_id": context.run_id,
            },
        )

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
        },
        partition=key,
    )
    shown = scores.table.copy()
    for column in ("val_accuracy", "accuracy", "ci_low", "ci_high", "macro_accuracy", "change_vs_baseline"):
        shown[column] = shown[column].map(
            lambda value, column=column: f"{value:+.1%}" if column == "change_vs_baseline" else f"{value:.1%}"
        )
    metadata = {
        "accuracy_by_step": dg.MetadataValue.md(shown.to_markdown(index=False)),
        "accuracy_chart": image_markdown(chart_path, "accuracy by step"),
        "best_step": scores.best_step,
        "best_test_accuracy": float(best["accuracy"]),
        "best_val_accuracy": float(best["val_accuracy"]),
        "baseline_accuracy": baseline_accuracy,
        "registered_model": f"{REGISTERED_MODEL_PREFIX}{key} v{version}",
        "mlflow_run_id": run.info.run_id,
        "table": dg.MetadataValue.path(str(table_path)),
    }
    if not scores.robustness.empty:
        metadata["accuracy_by_corruption"] = dg.MetadataValue.md(
            scores.robustness.to_markdown(index=False, floatfmt=".3f")
        )
    for row in scores.table.itertuples():
        context.log_event(
            dg.AssetObservation(
                asset_key=CHECKPOINT_ACCURACY,
                partition=key,
                metadata={
                    "step": int(row.step),
                    "test_accuracy": float(row.accuracy),
                    "val_accuracy": float(row.val_accuracy),
                },
            )
        )
    yield dg.MaterializeResult(metadata=metadata)
    beats = float(best["accuracy"]) > baseline_accuracy
    yield dg.AssetCheckResult(
        check_name="best_checkpoint_beats_baseline",
        passed=beats,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "best_test_accuracy": float(best["accuracy"]),
            "baseline_accuracy": baseline_accuracy,
            "best_step": scores.best_step,
        },
    )


training_assets = [lora_checkpoints, checkpoint_accuracy]
