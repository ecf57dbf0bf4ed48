"""LoRA training in several processes (torch.distributed), launched by `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 -m car_maker_pipeline.training.distributed REQUEST.json

(`--multi_gpu` is accelerate's torchrun launcher; without CUDA the processes use gloo on the CPU.)

`train_distributed` writes REQUEST.json (model, stored maker dataset, makers, output folder,
hyperparameters, MLflow run) and hands the `accelerate launch` command to a launcher: the
`lora_checkpoints` asset passes one that runs it through Dagster Pipes (`PipesSubprocessClient`) and
returns the messages the processes reported. Every process trains on its shard of each batch (DDP:
gloo on CPU, NCCL on GPUs); only rank 0 talks to Dagster (Pipes logs and the result) and to MLflow
(the loss callback checks `is_world_process_zero`), and only rank 0 writes checkpoints and their
completion markers. The same `train_lora` runs here as in one process, so the checkpoints, the
adapter and the MLflow run are the same things, and a killed run resumes the same way.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datasets

from car_maker_pipeline.data.tasks import MAKER, Task, get_task
from car_maker_pipeline.storage import write_json_atomic
from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
from car_maker_pipeline.training.mlflow_callback import MlflowLossCallback
from car_maker_pipeline.training.result import LoraTrainingResult
from car_maker_pipeline.training.trainer import train_lora

REQUEST_FILE = "distributed_request.json"

# Runs a command line to its end and returns the custom messages its processes reported.
Launcher = Callable[[list[str]], Iterable[Any]]


def accelerate_command(num_processes: int, request: Path) -> list[str]:
    """`accelerate launch` of this module over `num_processes` local processes, meeting on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
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


def train_distributed(
    num_processes: int,
    launch: Launcher,
    *,
    model_dir: str,
    dataset_path: str,
    makers: list[str],
    output_dir: Path,
    hyperparameters: LoraHyperparameters,
    mlflow_run_id: str,
    tracking_uri: str,
    pending_path: Path,
    task: Task = MAKER,
) -> tuple[LoraTrainingResult, int]:
    """Train over `num_processes` processes; returns rank 0's result and the world size it reported."""
    request = output_dir / REQUEST_FILE
    write_json_atomic(
        request,
        {
            "model_dir": model_dir,
            "dataset_path": dataset_path,
            "makers": makers,
            "output_dir": str(output_dir),
            "config": hyperparameters.to_json(),
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
            "pending_path": str(pending_path),
            "task": task.name,
        },
    )
    messages = launch(accelerate_command(num_processes, request))
    reports = [message for message in messages if isinstance(message, dict) and "result" in message]
    if not reports:
        raise LoraTrainingError(
            f"The {num_processes}-process training ended without a result from rank 0; see the logs above."
        )
    return LoraTrainingResult.from_json(reports[-1]["result"]), int(reports[-1]["world_size"])


def main(argv: list[str] | None = None) -> int:
    """One process of a distributed run: train on its shard; rank 0 reports the result through Pipes."""
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pipes = _open_pipes() if rank == 0 else nullcontext(None)
    with pipes as context:
        if context is not None:
            context.log.info(f"rank 0 of {world} processes: training {request['model_dir']}")
        data = datasets.load_from_disk(request["dataset_path"])
        losses = MlflowLossCallback(
            request["mlflow_run_id"], request["tracking_uri"], pending_path=request["pending_path"]
        )
        task = get_task(request.get("task", MAKER.name))
        result = train_lora(
            request["model_dir"],
            data["train"],
            data["validation"],
            request["makers"],
            request["output_dir"],
            LoraHyperparameters(**request["config"]),
            callbacks=[losses],
            prompt=task.prompt(request["makers"]),
            task=task,
        )
        if context is not None:
            context.report_custom_message({"result": result.to_json(), "world_size": world})
            context.log.info(
                f"trained to step {result.global_step} in {result.train_seconds:.0f}s on {world} processes"
            )
    return 0


def _open_pipes():
    """Dagster Pipes when launched by the asset; a no-op context when run by hand."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    return open_dagster_pipes() if os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR) else nullcontext(None)


if __name__ == "__main__":
    sys.exit(main())
