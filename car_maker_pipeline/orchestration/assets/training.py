"""Training: LoRA fine-tuning per model, a checkpoint every N steps, resumable after a crash."""

import json
import time
from pathlib import Path

import dagster as dg
from pydantic import Field, model_validator

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.orchestration.deployment import GPU_OP_TAGS
from car_maker_pipeline.orchestration.partitions import model_partitions
from car_maker_pipeline.orchestration.resources import MlflowTracking, StoreResource, VisionLanguageModels
from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.store import (
    CAR_MAKER_DATASET,
    LORA_CHECKPOINTS,
    PipelineStore,
)
from car_maker_pipeline.tracking import (
    TrackingUnavailableError,
    experiment_id,
    find_run,
    mlflow_run,
    scrub_secrets,
)

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
    return store.asset_dir(LORA_CHECKPOINTS, key) / f"{Path(dataset.path).name}-{config.fingerprint()}"


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
    name=LORA_CHECKPOINTS,
    group_name="training",
    owners=["team:ml-platform"],
    deps=[CAR_MAKER_DATASET],
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
    store: StoreResource,
    models: VisionLanguageModels,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    from car_maker_pipeline.training.lora import train_lora
    from car_maker_pipeline.training.mlflow_callback import PENDING_FILE, MlflowLossCallback

    pipeline_store = store.get()
    key = context.partition_key
    training_config = config.to_training_config()  # invalid hyperparameters fail before anything loads
    uri = mlflow_tracking.ensure_reachable(pipeline_store)
    dataset_record = pipeline_store.maker_dataset()
    dataset = dataset_record.load()
    base = models.path_or_id(key, pipeline_store)
    out_dir = _training_dir(pipeline_store, key, config, dataset_record)
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
    run_id = _training_run_id(out_dir, uri, pipeline_store.root, key, context, params)
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
    with mlflow_run(
        uri, pipeline_store.root, run_name=f"lora-{key}", tags={"dagster_run_id": context.run_id}, run_id=run_id
    ):
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
    pipeline_store.write_manifest(LORA_CHECKPOINTS, manifest, partition=key)
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


training_assets = [lora_checkpoints]
