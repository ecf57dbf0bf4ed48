"""LoRA training in several processes (torch.distributed), launched by `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 -m car_maker_pipeline.training.distributed REQUEST.json

(`--multi_gpu` is accelerate's torchrun launcher; without CUDA the processes use gloo on the CPU.)

The `lora_checkpoints` asset writes REQUEST.json (model, stored maker dataset, makers, output folder,
hyperparameters, MLflow run) and starts this module through Dagster Pipes (`PipesSubprocessClient`) when
`num_processes > 1`. Every process trains on its shard of each batch (DDP: gloo on CPU, NCCL on GPUs);
only rank 0 talks to Dagster (Pipes logs and the result) and to MLflow (the loss callback checks
`is_world_process_zero`), and only rank 0 writes checkpoints and their completion markers. The same
`train_lora` runs here as in one process, so the checkpoints, the adapter and the MLflow run are the
same things, and a killed run resumes the same way.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path


def write_request(
    path: Path,
    *,
    model_dir: str,
    dataset_path: str,
    makers: list[str],
    output_dir: str,
    config: dict,
    mlflow_run_id: str,
    tracking_uri: str,
    pending_path: str,
) -> Path:
    from car_maker_pipeline.storage import write_json_atomic

    write_json_atomic(
        path,
        {
            "model_dir": model_dir,
            "dataset_path": dataset_path,
            "makers": makers,
            "output_dir": output_dir,
            "config": config,
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
            "pending_path": pending_path,
        },
    )
    return path


def main(argv: list[str] | None = None) -> int:
    import datasets

    from car_maker_pipeline.training.lora import LoraTrainingConfig, train_lora
    from car_maker_pipeline.training.mlflow_callback import MlflowLossCallback

    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pipes = _open_pipes() if rank == 0 else nullcontext(None)
    with pipes as context:
        if context is not None:
            context.log.info(f"rank 0 of {world} processes: training {request['model_dir']}")
        data = datasets.load_from_disk(request["dataset_path"])
        config = LoraTrainingConfig(**request["config"])
        losses = MlflowLossCallback(
            request["mlflow_run_id"], request["tracking_uri"], pending_path=request["pending_path"]
        )
        result = train_lora(
            request["model_dir"],
            data["train"],
            data["validation"],
            request["makers"],
            request["output_dir"],
            config,
            callbacks=[losses],
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
