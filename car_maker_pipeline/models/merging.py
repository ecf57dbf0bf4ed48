"""Fold a LoRA adapter into its base model and save the result as a plain transformers model.

A merged model needs no PEFT at inference and runs the base model's own layers (no extra low-rank
matmuls per adapted layer), which is what edge runtimes and converters (llama.cpp, ONNX, ExecuTorch)
take as input. The folder holds safetensors weights, the config and the processor with its chat
template, and loads with `AutoModelForImageTextToText.from_pretrained` + `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

# Names that only exist in a PEFT-wrapped model; a merged folder must contain none of them.
ADAPTER_MARKERS = ("lora_", "base_layer", "adapter_config.json", "adapter_model")


class MergeError(RuntimeError):
    """The adapter could not be folded into a plain model."""


def merge_adapter(peft_model):
    """The base model with the active adapter's weights added in (W + scale * B @ A), unwrapped from PEFT.

    The base model's weights are changed in place: the PeftModel must not be used afterwards.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise MergeError(
            f"Expected a model with a LoRA adapter attached (a PeftModel), got {type(peft_model).__name__}."
        )
    return peft_model.merge_and_unload().eval()


def weight_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def save_merged(model, processor, out_dir: Path, card: dict) -> Path:
    """Write model (safetensors), processor (tokenizer, image processor, chat template) and `card` to `out_dir`."""
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / "car_maker_classifier.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    leftovers = [name for name in weight_names(out_dir) if any(marker in name for marker in ADAPTER_MARKERS)]
    leftovers += [path.name for path in out_dir.iterdir() if path.name.startswith("adapter_")]
    if leftovers:
        raise MergeError(f"The merged model in {out_dir} still holds adapter parts: {leftovers[:5]}.")
    if not any(out_dir.glob("*.safetensors")):
        raise MergeError(f"No safetensors weights were written to {out_dir}.")
    return out_dir
