"""The Kubernetes path, as far as it can be exercised without a cluster: the definitions load with
`k8s_job_executor`, the GPU steps' op tags render into Jobs that ask for a GPU, the data steps' do not,
and the Helm values and storage manifest say what the README promises. (Deploying the chart, pulling
the image and scheduling on GPU nodes need a cluster and are not tested here.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _job_with_k8s_executor() -> dict:
    code = (
        "import json\n"
        "from car_maker_pipeline.definitions import defs\n"
        "out = {}\n"
        "for name in ('data_job', 'baseline_job', 'training_job', 'retrain_job'):\n"
        "    job = defs.resolve_job_def(name)\n"
        "    out[name] = {'executor': job.executor_def.name, 'tags': {n.name: dict(n.tags) for n in job.graph.nodes}}\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "CAR_MAKER_EXECUTOR": "k8s", "CAR_MAKER_PROFILE": "real"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_job_runs_its_steps_as_kubernetes_jobs_when_asked():
    jobs = _job_with_k8s_executor()
    assert {job["executor"] for job in jobs.values()} == {"k8s"}


def test_gpu_steps_render_into_jobs_that_request_a_gpu():
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    jobs = _job_with_k8s_executor()
    steps = {**jobs["training_job"]["tags"], **jobs["baseline_job"]["tags"], **jobs["data_job"]["tags"]}
    config = DagsterK8sJobConfig(
        job_image="registry.example.com/car-maker-pipeline:0.1.0",
        dagster_home="/opt/dagster/home",
        instance_config_map="car-maker-instance",
    )

    def render(step: str):
        tags = {key: value if isinstance(value, str) else json.dumps(value) for key, value in steps[step].items()}
        return construct_dagster_k8s_job(
            config,
            ["dagster", "api", "execute_step"],
            f"step-{step.replace('_', '-')}",
            get_user_defined_k8s_config(tags),
        ).to_dict()

    for step in ("baseline_evaluation", "lora_checkpoints", "checkpoint_accuracy"):
        pod = render(step)["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1", step
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["node_selector"] == {
            "car-maker/accelerator": "nvidia-gpu"
        }
    for step in ("raw_stanford_cars", "car_maker_dataset"):
        resources = render(step)["spec"]["template"]["spec"]["containers"][0]["resources"] or {}
        assert "nvidia.com/gpu" not in json.dumps(resources), step


def test_helm_values_match_the_pipeline():
    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "car_maker_pipeline.definitions"]
    assert env["CAR_MAKER_EXECUTOR"] == "k8s" and env["CAR_MAKER_PROFILE"] == "real"
    assert "HF_TOKEN" not in json.dumps(values)  # the token comes from a Secret, never from values
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] == 4
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    claim = yaml.safe_load((REPO / "deploy" / "k8s" / "storage.yaml").read_text())
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["name"] == deployment["volumes"][0]["persistentVolumeClaim"]["claimName"]


def test_an_unknown_executor_is_a_clear_error(monkeypatch):
    from car_maker_pipeline.orchestration.deployment import executor

    monkeypatch.setenv("CAR_MAKER_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match=r"CAR_MAKER_EXECUTOR='slurm': use 'local' \(default\) or 'k8s'"):
        executor()
