"""Train one model of the pipeline: its training folder, its MLflow run, one or several processes, the manifest.

This is what the `lora_checkpoints` asset runs for a partition, with no Dagster in it: the asset
resolves the store, the maker dataset, the base model and the tracking URI, and passes a launcher
for runs over several processes (Dagster Pipes); everything else happens here.

Same model, data and hyperparameters give the same training folder, so a rerun after a crash
resumes in it (and in its MLflow run) instead of starting over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from car_maker_pipeline.data.maker_dataset import MakerDataset
from car_maker_pipeline.data.tasks import MAKER, Task, dataset_answers
from car_maker_pipeline.store import LORA_CHECKPOINTS, PipelineStore
from car_maker_pipeline.tracking import system_metrics
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.continuation import find_training_dir
from car_maker_pipeline.training.distributed import Launcher, train_distributed
from car_maker_pipeline.training.mlflow_callback import PENDING_FILE, MlflowLossCallback
from car_maker_pipeline.training.mlflow_run import complete_record, training_run_id
from car_maker_pipeline.training.result import LoraTrainingResult
from car_maker_pipeline.training.trainer import train_lora

logger = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    result: LoraTrainingResult
    output_dir: Path
    mlflow_run_id: str
    world_size: int  # training processes
    wall_seconds: float  # training, with the launch of its processes and the model load
    samples_per_second: float  # training images per second over the steps trained by this call


def training_dir(
    store: PipelineStore,
    model_key: str,
    dataset: MakerDataset,
    hyperparameters: LoraHyperparameters,
    num_processes: int,
    task: Task = MAKER,
) -> Path:
    """Same model, task, data and maths -> same folder, so a rerun resumes (or continues, or shortens the run)
    instead of starting over; a folder named by an earlier release is found again (continuation.py)."""
    root = store.asset_dir(LORA_CHECKPOINTS, task.partition(model_key))
    return find_training_dir(root, Path(dataset.path).name, hyperparameters, num_processes)


def train_model(
    store: PipelineStore,
    model_key: str,
    base_model: str,
    dataset_record: MakerDataset,
    hyperparameters: LoraHyperparameters,
    *,
    num_processes: int = 1,
    tracking_uri: str,
    run_tags: dict[str, str],
    launch: Launcher | None = None,
    log=logger,
    task: Task = MAKER,
) -> TrainedModel:
    """Fine-tune `base_model` on the maker dataset for `task` (its makers, or its class names with the class
    task's prompt), record it in MLflow and make it the partition's current run.

    `launch` runs the `accelerate launch` command when `num_processes > 1` (see distributed.py);
    `log` receives the step's warnings (a `logging.Logger` or Dagster's `context.log`).
    """
    if num_processes > 1 and launch is None:
        raise LoraTrainingError(f"num_processes={num_processes} needs a launcher for `accelerate launch`.")
    dataset = dataset_record.load()
    answers = dataset_answers(task, dataset_record.makers, dataset)
    partition = task.partition(model_key)
    out_dir = training_dir(store, model_key, dataset_record, hyperparameters, num_processes, task)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {
        **hyperparameters.to_json(),
        "target_modules": ",".join(hyperparameters.target_modules),
        "model_key": model_key,
        "task": task.name,
        "num_answers": len(answers),
        "base_model": base_model,
        "dataset_revision": dataset_record.source_revision,
        "train_images": dataset["train"].num_rows,
        "num_processes": num_processes,
    }
    run_id = training_run_id(out_dir, tracking_uri, store.root, partition, run_tags, params)
    losses = MlflowLossCallback(run_id, tracking_uri, pending_path=out_dir / PENDING_FILE)
    started = time.perf_counter()
    # The machine's CPU, memory (and GPU) while it trains, sampled into the training run.
    with system_metrics(run_id, tracking_uri):
        if num_processes > 1:
            result, world_size = train_distributed(
                num_processes,
                launch,
                model_dir=base_model,
                dataset_path=dataset_record.path,
                makers=answers,
                output_dir=out_dir,
                hyperparameters=hyperparameters,
                mlflow_run_id=run_id,
                tracking_uri=tracking_uri,
                pending_path=losses.pending_path,
                task=task,
            )
        else:
            result = train_lora(
                base_model,
                dataset["train"],
                dataset["validation"],
                answers,
                out_dir,
                hyperparameters,
                callbacks=[losses],
                prompt=task.prompt(answers),
                task=task,
            )
            world_size = 1
    wall_seconds = time.perf_counter() - started
    complete_record(
        losses,
        result,
        uri=tracking_uri,
        home=store.root,
        model_key=partition,
        run_id=run_id,
        run_tags=run_tags,
        log=log,
    )
    manifest = {
        **result.to_json(),
        "mlflow_run_id": run_id,
        "base_model": base_model,
        "makers": answers,  # what the adapter answers: the makers, or the class task's classes
        "task": task.name,
        "dataset_path": dataset_record.path,
    }
    store.write_manifest(LORA_CHECKPOINTS, manifest, partition=partition)
    for quarantined in result.quarantined:
        log.warning(
            f"{partition}: checkpoint-{quarantined.step} failed verification ({'; '.join(quarantined.problems)}) "
            f"and was moved to {quarantined.moved_to}; training resumed from {result.resumed_from or 'the start'}."
        )
    log.info(
        f"{partition}: {result.global_step} steps, adapted layers {result.adapted_layers}, "
        f"resumed from {result.resumed_from}"
    )
    resumed_step = int(result.resumed_from.name.split("-")[-1]) if result.resumed_from else 0
    samples = (
        (result.global_step - resumed_step)
        * hyperparameters.per_device_train_batch_size
        * hyperparameters.gradient_accumulation_steps
        * world_size
    )
    return TrainedModel(
        result=result,
        output_dir=out_dir,
        mlflow_run_id=run_id,
        world_size=world_size,
        wall_seconds=wall_seconds,
        samples_per_second=samples / result.train_seconds if result.train_seconds > 0 else 0.0,
    )
