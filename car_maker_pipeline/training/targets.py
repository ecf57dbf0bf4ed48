"""Which layers LoRA adapts: PEFT's target-name rule, checked against the model before training.

The default targets are Liquid's own VLM recipe (leap-finetune `LFM2_VLM_LORA_CONFIG`):
`q_proj k_proj v_proj out_proj in_proj fc1 fc2 linear_1 linear_2`, given as bare names, which PEFT
matches as suffixes of module names. On LFM2-VL these names adapt
- language model: attention `self_attn.{q,k,v,out}_proj` and both short-conv projections
  `conv.in_proj` and `conv.out_proj` (`out_proj` matches both; this is deliberate and what Liquid's
  recipe does too: the conv block's output projection is the analogue of the attention output);
  the gated MLP `feed_forward.w1/w2/w3` is left frozen;
- vision tower (SigLIP2): attention `self_attn.{q,k,v,out}_proj` and MLP `mlp.fc1/fc2`;
- projector: `linear_1`, `linear_2`.
For LFM2-VL-450M that is 44 language-model layers (6 attention x 4 + 10 conv x 2), 72 vision
layers (12 x 6) and 2 projector layers. `vision_lr_scale` (Liquid uses 0.1) lowers the learning
rate of the LoRA weights inside the vision tower only (see trainer.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.lora import LoraLayer

from car_maker_pipeline.training.config import LoraTrainingError

COMPONENTS = ("vision_tower", "projector", "language_model")


def component_of(module_name: str) -> str:
    """Which part of LFM2-VL a module belongs to: vision_tower, projector, language_model or other."""
    if ".vision_tower." in f".{module_name}.":
        return "vision_tower"
    if ".multi_modal_projector." in f".{module_name}.":
        return "projector"
    if ".language_model." in f".{module_name}.":
        return "language_model"
    return "other"


def _matches(module_name: str, target: str) -> bool:
    # PEFT's rule for a list of names: the full name, or a suffix starting at a dot.
    return module_name == target or module_name.endswith("." + target)


def match_target_modules(model, target_modules: Sequence[str]) -> dict[str, list[str]]:
    """Module names of `model` that each target name would adapt (PEFT's suffix rule, Linear layers).

    Raises `LoraTrainingError` naming every target that matches no Linear layer, with the names of
    the Linear layers that do exist, before any adapter is created.
    """
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    matched = {target: [name for name in linear_names if _matches(name, target)] for target in target_modules}
    missing = [target for target, names in matched.items() if not names]
    if missing:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise LoraTrainingError(
            f"LoRA target module(s) {missing} match no Linear layer of this model, so they would silently "
            f"train nothing. Linear layer names in this model: {leaf_names}. Fix target_modules."
        )
    return matched


def count_adapted_layers(model) -> tuple[dict[str, int], list[str]]:
    """Per-component count of LoRA-adapted layers in a PEFT model, and their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    counts = {component: 0 for component in COMPONENTS}
    for name in names:
        component = component_of(name)
        counts[component] = counts.get(component, 0) + 1
    return counts, names
