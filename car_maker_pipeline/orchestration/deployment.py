"""Where steps run: in local processes (the default) or as Kubernetes Jobs (`CAR_MAKER_EXECUTOR=k8s`).

On Kubernetes (deploy/k8s/values.yaml, dagster-k8s) the run launcher starts each run as a Job and
`k8s_job_executor` starts each step as a Job of its own; the `dagster-k8s/config` op tag below gives
the GPU-heavy steps (baseline evaluation, fine-tuning, checkpoint scoring) one NVIDIA GPU and the
memory a 3B model needs, while the data steps stay on CPU nodes. Outside Kubernetes the tag is inert.
"""

import os

from car_maker_pipeline.orchestration.partitions import model_partitions

EXECUTOR_ENV = "CAR_MAKER_EXECUTOR"

GPU_STEP_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
        },
    },
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "node_selector": {"car-maker/accelerator": "nvidia-gpu"},
    },
}
GPU_OP_TAGS = {"dagster-k8s/config": GPU_STEP_K8S_CONFIG}
# What every model step shares: one partition per model and task, the team that owns it, one GPU step at a time
# (the `gpu` pool) and, on Kubernetes, a GPU for its pod. `@dg.asset(..., **MODEL_STEP)`.
OWNERS = ["team:ml-platform"]
MODEL_STEP = {
    "owners": OWNERS,
    "partitions_def": model_partitions,
    "pool": "gpu",
    "op_tags": GPU_OP_TAGS,
}


def executor():
    """The executor for every job: None (Dagster's default multiprocess executor) unless CAR_MAKER_EXECUTOR=k8s."""
    choice = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    if choice in ("", "local", "multiprocess"):
        return None
    if choice == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as error:
            raise RuntimeError(
                f"{EXECUTOR_ENV}=k8s needs dagster-k8s: pip install 'car_maker_pipeline[scale]'."
            ) from error
        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={choice!r}: use 'local' (default) or 'k8s'.")
