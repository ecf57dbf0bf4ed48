"""Hand-made checkpoint folders with the pipeline's completion marker, for tests of resume and verification."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json")


def marked_checkpoint(run_dir: Path, step: int, content: str | None = None) -> Path:
    """`run_dir/checkpoint-<step>` holding small stand-in files, marked complete as training would.

    Each file holds `content` formatted with its `name` and `step` (default: an empty JSON object).
    """
    from car_maker_pipeline.models.checkpoint_marker import mark_checkpoint_complete

    folder = Path(run_dir) / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (folder / name).write_text("{}" if content is None else content.format(name=name, step=step))
    mark_checkpoint_complete(folder, step)
    return folder
