"""What the pipeline loads, executes and exposes: no remote code, no pickles, only its own
checkpoints, services on loopback. (The token search over every store is in test_cli_end_to_end.py,
after all stages ran from the command line with HF_TOKEN set.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_remote_code_in_a_model_folder_is_never_executed(tmp_path, tiny_model_dir):
    from car_maker_pipeline.models.loading import ModelLoadError, load_model_and_processor

    model_dir = tmp_path / "with_remote_code"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "remote_code_ran"
    (model_dir / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedModel\nclass Evil(PreTrainedModel):\n    pass\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.Evil"}
    (model_dir / "config.json").write_text(json.dumps(config))
    try:
        loaded = load_model_and_processor(str(model_dir))
        assert type(loaded.model).__name__ == "Lfm2VlForConditionalGeneration"  # the library's class, not the folder's
    except (ModelLoadError, ValueError) as error:  # refusing outright is also acceptable
        assert "trust_remote_code" in str(error) or "remote code" in str(error)  # noqa: PT017 (either outcome is acceptable)
    assert not marker.exists(), "code shipped inside the model folder was executed"


def test_only_checkpoints_this_pipeline_completed_are_resumed(tmp_path):
    from car_maker_pipeline.models.checkpoint_marker import CHECKPOINT_MARKER, CHECKPOINT_REQUIRED_FILES
    from car_maker_pipeline.training.checkpoints import complete_checkpoints, quarantine_unusable_checkpoints

    run = tmp_path / "run"
    foreign = run / "checkpoint-30"  # a checkpoint written by anyone else: all files, no completion marker
    foreign.mkdir(parents=True)
    for name in CHECKPOINT_REQUIRED_FILES:
        (foreign / name).write_text("{}")
    tampered = run / "checkpoint-20"  # ours once, then a file changed behind the marker's back
    tampered.mkdir()
    for name in CHECKPOINT_REQUIRED_FILES:
        (tampered / name).write_text("{}")
    sizes = {name: (tampered / name).stat().st_size for name in CHECKPOINT_REQUIRED_FILES}
    (tampered / CHECKPOINT_MARKER).write_text(json.dumps({"global_step": 20, "files": sizes}))
    ours = run / "checkpoint-10"
    shutil.copytree(tampered, ours)
    (tampered / "adapter_model.safetensors").write_bytes(b"a different, larger adapter")

    assert list(complete_checkpoints(run)) == [10]
    moved = quarantine_unusable_checkpoints(run)
    assert sorted(q.moved_to.name.rsplit("-", 1)[0] for q in moved) == ["checkpoint-20", "checkpoint-30"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10"]


@pytest.mark.parametrize(("target", "flag"), [("ui", "-h 127.0.0.1"), ("mlflow-ui", "--host 127.0.0.1")])
def test_services_the_project_starts_listen_on_loopback(target, flag):
    commands = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    server_line = next(line for line in commands.splitlines() if "dagster dev" in line or "mlflow ui" in line)
    assert flag in server_line and "0.0.0.0" not in server_line


def test_hf_token_is_scrubbed_from_logged_parameters(monkeypatch):
    from car_maker_pipeline.tracking import scrub_secrets

    monkeypatch.setenv("HF_TOKEN", "hf_FAKEscrubTOKEN123")
    params = {"learning_rate": 0.001, "hub_token": "anything", "api_password": "x", "note": "hf_FAKEscrubTOKEN123"}
    assert scrub_secrets(params) == {"learning_rate": 0.001}
