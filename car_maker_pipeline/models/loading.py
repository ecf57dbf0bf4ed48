"""Load an LFM2-VL model and its processor from a Hub id or a local directory, the same way for both.

`trust_remote_code` is never set and only safetensors weights are accepted, so loading a model can
never execute code from the model's folder or unpickle arbitrary objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

REQUIRED_LOCAL_FILES = (
    "config.json",
    "processor_config.json|preprocessor_config.json",
    "tokenizer.json",
    "*.safetensors",
)


class ModelLoadError(ValueError):
    """A model directory or id that cannot be loaded; the message names it and says what is missing."""


@dataclass
class LoadedModel:
    model: object
    processor: object
    path_or_id: str
    revision: str
    device: str
    dtype: str


def choose_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(dtype: str, device: str) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lossy), unless configured."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError as error:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.") from error


def check_local_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"Model directory {path} does not exist.")
    missing = []
    for pattern in REQUIRED_LOCAL_FILES:
        if not any(any(path.glob(option)) for option in pattern.split("|")):
            missing.append(pattern.replace("|", " or "))
    if missing:
        raise ModelLoadError(
            f"Model directory {path} is missing {', '.join(missing)}. Save the model with "
            "model.save_pretrained(..., safe_serialization=True) and processor.save_pretrained(...) into it, "
            "or rebuild the demo models by deleting the folder."
        )


def local_revision(path: Path) -> str:
    """Content fingerprint of a local model: its config and weight files."""
    digest = hashlib.sha256()
    for file in sorted([path / "config.json", *path.glob("*.safetensors")]):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:16]


def check_image_token(model, processor, path_or_id: str) -> None:
    """The tokenizer must have the image placeholder token, with the id the model expects."""
    tokenizer = processor.tokenizer
    token = getattr(processor, "image_token", "<image>")
    token_id = tokenizer.convert_tokens_to_ids(token)
    expected = getattr(model.config, "image_token_id", None)
    if token_id is None or token_id == tokenizer.unk_token_id or token_id != expected:
        raise ModelLoadError(
            f"The tokenizer of {path_or_id} has no image token {token!r} with id {expected} (model.config.image_token_id); "
            f"it maps to {token_id}. The tokenizer does not belong to this model: save the model's own processor next to it."
        )


def is_local(path_or_id: str) -> bool:
    return path_or_id.startswith(("/", "./", "../", "~")) or Path(path_or_id).exists()


def import_model_libraries() -> None:
    """Import what loading, running and adapting a model needs (transformers' LFM2-VL model and
    processor, torchvision through the image processor, PEFT): about 5 s of CPU on a small machine.

    A model step calls this while its run starts (the models resource's setup), so the time is not
    spent inside the step, where the run holds the `gpu` pool's only slot and other runs wait.
    """
    import peft  # noqa: F401
    from transformers import Lfm2VlForConditionalGeneration, Lfm2VlProcessor  # noqa: F401


def load_model_and_processor(
    path_or_id: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto"
) -> LoadedModel:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    if is_local(path_or_id):
        check_local_model_dir(Path(path_or_id).expanduser())
    try:
        processor = AutoProcessor.from_pretrained(path_or_id, revision=revision, trust_remote_code=False)
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_id,
            revision=revision,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=False,
        )
    except OSError as error:
        raise ModelLoadError(
            f"Could not load model {path_or_id!r}: {str(error).splitlines()[0]}. Without network access use the demo "
            "profile (CAR_MAKER_PROFILE=demo) or a local model directory."
        ) from error
    check_image_token(model, processor, path_or_id)
    model.to(device).eval()
    if is_local(path_or_id):
        resolved = local_revision(Path(path_or_id).expanduser())
    else:
        resolved = getattr(model.config, "_commit_hash", None) or revision or "unknown"
    return LoadedModel(model, processor, path_or_id, resolved, device, str(torch_dtype).replace("torch.", ""))


class AdapterMismatchError(ModelLoadError):
    """A LoRA adapter trained on another base model than the one it is being attached to."""


def attach_adapter(model, adapter_dir: str | Path, adapter_name: str = "default"):
    """Attach a PEFT adapter folder to `model` (a base model, or a PeftModel to add one more adapter to).

    An adapter from another base model fails inside PEFT with a wall of tensor-shape mismatches; this
    turns that into one message naming the adapter, the model it was trained on and what to use instead.
    """
    import json

    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterMismatchError(f"{adapter_dir} has no adapter_config.json: it is not a LoRA adapter folder.")
    trained_on = json.loads(config_path.read_text()).get("base_model_name_or_path")
    base = model.base_model.model if isinstance(model, PeftModel) else model
    target = getattr(base, "name_or_path", None) or "this model"
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as error:
        text = str(error)
        if not any(marker in text for marker in ("size mismatch", "Target module", "not found in the base model")):
            raise
        detail = next(
            (line.strip() for line in text.splitlines() if "size mismatch" in line or "Target module" in line),
            text.strip().splitlines()[0],
        )
        raise AdapterMismatchError(
            f"The adapter in {adapter_dir} was trained on {trained_on!r} and does not fit {target!r} "
            f"(first difference: {detail}). Use a checkpoint from this model's own "
            "lora_checkpoints partition, or load the base model the adapter was trained on."
        ) from error
