"""Load an LFM2-VL model and its processor from a Hub id or a local directory, the same way for both.

`trust_remote_code` is never set and only safetensors weights are accepted, so loading a model can
never execute code from the model's folder or unpickle arbitrary objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

REQUIRED_LOCAL_FILES = ("config.json", "processor_config.json|preprocessor_config.json", "tokenizer.json", "*.safetensors")


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


def load_model_and_processor(path_or_id: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    if is_local(path_or_id):
        check_local_model_dir(Path(path_or_id).expanduser())
    try:
        processor = AutoProcessor.from_pretrained(path_or_id, revision=revision, trust_remote_code=False)
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_id, revision=revision, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False,
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
