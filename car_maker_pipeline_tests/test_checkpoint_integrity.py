"""A checkpoint changed after it was marked complete is never trusted: it is quarantined and its steps retrained.

The completion marker records the size and sha256 of every file of a checkpoint. `verify_checkpoint`
lists what no longer matches; resuming, and scoring (through `verified_checkpoints`), use only
checkpoints that pass.

| #  | change after the save                                   | verify_checkpoint says                       | test |
|----|---------------------------------------------------------|----------------------------------------------|------|
| 1  | bytes flipped in the adapter's header (unreadable)      | adapter sha256 differs                       | test_every_change_to_a_marked_checkpoint_is_found |
| 2  | bytes flipped in the adapter's tensor data (loads fine) | adapter sha256 differs                       | (same, parametrized) |
| 3  | adapter truncated                                       | its size differs                             | (same) |
| 4  | adapter_config.json: same size, other bytes             | config sha256 differs                        | (same) |
| 5  | trainer_state.json edited                               | state sha256 differs                         | (same) |
| 6  | a listed file deleted (optimizer.pt)                    | missing                                      | (same) |
| 7  | a file added (adapter_model.bin)                        | added after the checkpoint was written       | (same) |
| 8  | marker deleted / garbled / listing a path outside       | no marker / unreadable marker / outside      | (same) |
| 9  | marker from before hashes (sizes only), files intact    | nothing; a warning: checked by size only     | test_markers_from_before_content_hashes_are_checked_by_size |
| 10 | same, a file of another size                            | its size differs                             | (same) |
| 11 | same, a same-size change                                | nothing: cannot be seen without hashes       | (same) |
| 12 | newest checkpoint tampered (1, 3, 4, 6), then train_lora | quarantined; resumes from the previous one; same final step and adapter as an untouched run | test_a_tampered_newest_checkpoint_is_quarantined_and_retrained |
| 13 | older checkpoint tampered, run finished                 | quarantined; later checkpoints kept; nothing retrained | test_a_tampered_older_checkpoint_is_quarantined_and_the_rest_kept |
| 14 | newest tampered, `lora_checkpoints` materialized again  | run succeeds; metadata, manifest and log name it and why | test_the_asset_rerun_after_tampering_succeeds_and_says_why |
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from car_maker_pipeline.models.checkpoint_marker import (
    CHECKPOINT_MARKER,
    mark_checkpoint_complete,
    verified_checkpoints,
    verify_checkpoint,
)
from car_maker_pipeline.training.checkpoints import QUARANTINE_DIR, QUARANTINE_NOTE, complete_checkpoints
from car_maker_pipeline.training.config import LoraHyperparameters
from car_maker_pipeline.training.trainer import LoraTrainingResult, train_lora
from car_maker_pipeline_tests.support.checkpoints import marked_checkpoint

ADAPTER = "adapter_model.safetensors"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _same_size_other_bytes(path: Path) -> None:
    text = path.read_text()
    path.write_text(text.replace('"r": 8', '"r": 9') if '"r": 8' in text else text[::-1])


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


TAMPERS = {
    "adapter_header_flipped": (lambda c: _flip(c / ADAPTER, 0), f"{ADAPTER} changed after it was written"),
    "adapter_data_flipped": (
        lambda c: _flip(c / ADAPTER, (c / ADAPTER).stat().st_size - 3),
        f"{ADAPTER} changed after it was written",
    ),
    "adapter_truncated": (lambda c: _truncate(c / ADAPTER), rf"{ADAPTER} has \d+ bytes; \d+ were written"),
    "config_same_size": (
        lambda c: _same_size_other_bytes(c / "adapter_config.json"),
        "adapter_config.json changed after it was written",
    ),
    "state_edited": (
        lambda c: (c / "trainer_state.json").write_text(
            json.dumps({**json.loads((c / "trainer_state.json").read_text()), "global_step": 2})
        ),
        "trainer_state.json (changed after it was written|has)",
    ),
    "optimizer_deleted": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "file_added": (
        lambda c: (c / "adapter_model.bin").write_bytes(b"pickled weights"),
        "adapter_model.bin was added after the checkpoint was written",
    ),
    "marker_deleted": (lambda c: (c / CHECKPOINT_MARKER).unlink(), "no completion marker"),
    "marker_garbled": (lambda c: (c / CHECKPOINT_MARKER).write_text("{not json"), "unreadable completion marker"),
    "marker_lists_outside": (
        lambda c: (c / CHECKPOINT_MARKER).write_text(
            json.dumps({"files": {**json.loads((c / CHECKPOINT_MARKER).read_text())["files"], "../x": 1}})
        ),
        "a path outside the checkpoint",
    ),
}


def _fake_checkpoint(path: Path, step: int = 4) -> Path:
    """A checkpoint-shaped folder (random tensors, JSON state, an optimizer blob), marked complete."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"lora_A": torch.randn(8, 16), "lora_B": torch.randn(16, 8)}, str(path / ADAPTER))
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 8, "log_history": []}))
    (path / "optimizer.pt").write_bytes(torch.randn(64).numpy().tobytes())
    mark_checkpoint_complete(path, step)
    return path


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_every_change_to_a_marked_checkpoint_is_found(tmp_path, tamper):
    checkpoint = _fake_checkpoint(tmp_path / "run" / "checkpoint-4")
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    for name, recorded in marker["files"].items():  # the marker binds size and content of every file
        assert recorded["size"] == (checkpoint / name).stat().st_size
        assert len(recorded["sha256"]) == 64
    assert verify_checkpoint(checkpoint) == []

    change, expected = TAMPERS[tamper]
    change(checkpoint)
    problems = verify_checkpoint(checkpoint)
    assert len(problems) == 1 and re.search(expected, problems[0]), problems
    assert complete_checkpoints(tmp_path / "run") == {}
    usable, rejected = verified_checkpoints({4: checkpoint, 8: _fake_checkpoint(tmp_path / "run" / "checkpoint-8", 8)})
    assert list(usable) == [8] and rejected == {4: problems}


def test_markers_from_before_content_hashes_are_checked_by_size(tmp_path, caplog):
    checkpoint = _fake_checkpoint(tmp_path / "checkpoint-4")
    files = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())["files"]
    (checkpoint / CHECKPOINT_MARKER).write_text(
        json.dumps({"global_step": 4, "files": {name: entry["size"] for name, entry in files.items()}})
    )
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(checkpoint) == []
    assert "checked by size only" in caplog.text

    _same_size_other_bytes(checkpoint / "adapter_config.json")  # cannot be seen without a hash: accepted
    assert verify_checkpoint(checkpoint) == []
    _truncate(checkpoint / ADAPTER)
    assert verify_checkpoint(checkpoint) == [
        f"{ADAPTER} has {files[ADAPTER]['size'] // 2} bytes; {files[ADAPTER]['size']} were written"
    ]


# --------------------------------------------------------------------------------------------
# With real training: tiny-s, 6 steps, a checkpoint every 2
# --------------------------------------------------------------------------------------------

MAX_STEPS, EVERY = 6, 2
HYPERPARAMETERS = LoraHyperparameters(
    max_steps=MAX_STEPS, checkpoint_every_n_steps=EVERY, per_device_train_batch_size=4, logging_steps=1
)


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, maker_dataset, tmp_path_factory):
    """An untouched finished run, copied by each test before it tampers with the copy."""
    data = maker_dataset.load()
    out = tmp_path_factory.mktemp("integrity") / "reference"
    result = train_lora(tiny_model_dir, data["train"], data["validation"], maker_dataset.makers, out, HYPERPARAMETERS)
    assert sorted(result.checkpoints) == [2, 4, 6]
    return out, data


def _rerun(tiny_model_dir, maker_dataset, data, out):
    return train_lora(tiny_model_dir, data["train"], data["validation"], maker_dataset.makers, out, HYPERPARAMETERS)


@pytest.mark.parametrize(
    "tamper", ["adapter_header_flipped", "adapter_truncated", "config_same_size", "optimizer_deleted"]
)
def test_a_tampered_newest_checkpoint_is_quarantined_and_retrained(
    tiny_model_dir, maker_dataset, reference_run, tmp_path, caplog, tamper
):
    reference, data = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    TAMPERS[tamper][0](out / f"checkpoint-{MAX_STEPS}")

    with caplog.at_level(logging.WARNING):
        result = _rerun(tiny_model_dir, maker_dataset, data, out)
    assert "cannot be trusted" in caplog.text and f"checkpoint-{MAX_STEPS}" in caplog.text
    assert result.resumed_from == out / f"checkpoint-{MAX_STEPS - EVERY}" and result.train_seconds > 0
    assert result.global_step == MAX_STEPS and sorted(result.checkpoints) == [2, 4, 6]
    [quarantined] = result.quarantined
    assert quarantined.step == MAX_STEPS and quarantined.moved_to.parent == out / QUARANTINE_DIR
    assert json.loads((quarantined.moved_to / QUARANTINE_NOTE).read_text())["problems"] == quarantined.problems
    assert LoraTrainingResult.from_json(result.to_json()).quarantined == [quarantined]  # as rank 0 reports it
    assert verify_checkpoint(out / f"checkpoint-{MAX_STEPS}") == []
    # The retrained span ends where the untouched run ended.
    retrained, untouched = (
        load_file(str(result.final_checkpoint / ADAPTER)),
        load_file(str(reference / f"checkpoint-{MAX_STEPS}" / ADAPTER)),
    )
    assert retrained.keys() == untouched.keys()
    for key in untouched:
        torch.testing.assert_close(retrained[key], untouched[key], atol=1e-4, rtol=1e-3)


def test_a_tampered_older_checkpoint_is_quarantined_and_the_rest_kept(
    tiny_model_dir, maker_dataset, reference_run, tmp_path
):
    reference, data = reference_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    TAMPERS["adapter_data_flipped"][0](out / "checkpoint-2")

    result = _rerun(tiny_model_dir, maker_dataset, data, out)
    assert result.train_seconds == 0.0 and result.resumed_from == out / f"checkpoint-{MAX_STEPS}"  # nothing retrained
    assert sorted(result.checkpoints) == [4, 6] and [q.step for q in result.quarantined] == [2]
    assert "sha256 differs" in result.quarantined[0].problems[0]


def test_the_asset_rerun_after_tampering_succeeds_and_says_why(tmp_path):
    import dagster as dg

    from car_maker_pipeline.orchestration.assets.training import lora_checkpoints
    from car_maker_pipeline.store import LORA_CHECKPOINTS, PipelineStore
    from car_maker_pipeline_tests.support.pipeline import materialized_demo_data

    resources, instance, _ = materialized_demo_data(tmp_path, train_per_maker=6, test_per_maker=2, corruptions=[])
    config = {"max_steps": 4, "checkpoint_every_n_steps": 2, "per_device_train_batch_size": 4}

    def materialize():
        result = dg.materialize(
            [lora_checkpoints],
            resources=resources,
            instance=instance,
            partition_key="tiny-s|maker",
            run_config={"ops": {"lora_checkpoints": {"config": config}}},
        )
        assert result.success
        return result, result.asset_materializations_for_node("lora_checkpoints")[0].metadata

    _, first = materialize()
    assert first["quarantined_checkpoints"].value == []
    newest = Path(first["path"].value) / "checkpoint-4"
    TAMPERS["adapter_header_flipped"][0](newest)  # what safetensors can no longer read

    result, again = materialize()
    assert again["global_step"].value == 4 and again["checkpoints"].value == [2, 4]
    assert again["resumed_from"].value.endswith("checkpoint-2")
    [quarantined] = again["quarantined_checkpoints"].value
    assert quarantined["step"] == 4 and "sha256 differs" in quarantined["problems"][0]
    manifest = PipelineStore(tmp_path).read_manifest(LORA_CHECKPOINTS, "tiny-s")
    assert manifest["quarantined"] == [quarantined]
    usable, rejected = verified_checkpoints({int(s): p for s, p in manifest["checkpoints"].items()})
    assert sorted(usable) == [2, 4] and not rejected
    warnings = [
        record.user_message
        for record in instance.all_logs(result.run_id)
        if record.level == logging.WARNING and "failed verification" in record.user_message
    ]
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0] and "sha256 differs" in warnings[0]


def test_checkpoint_accuracy_never_scores_a_changed_checkpoint(tmp_path):
    """The scoring side: a checkpoint listed by training but changed since is left out, with a warning."""
    from car_maker_pipeline.recording.checkpoint_accuracy import listed_checkpoints

    listed = {str(step): str(marked_checkpoint(tmp_path, step, "{name} at step {step}")) for step in (1, 2, 3)}
    adapter = tmp_path / "checkpoint-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[::-1])  # same size, other bytes
    warnings: list[str] = []
    usable = listed_checkpoints({"checkpoints": listed}, warnings.append)
    assert sorted(usable) == [1, 3]
    assert len(warnings) == 1 and "checkpoint-2" in warnings[0] and "adapter_model.safetensors" in warnings[0]
