"""LFM2-VL at the real checkpoints' shapes, with random weights: for benchmarks, never for accuracy.

The Hub checkpoints cannot be downloaded here, but speed and memory depend on shapes, not on weight
values. These folders have the real layer sizes (from the published configs) and LFM2-VL's real
image processor (512 px tiles, 16 px patches, 64..256 tokens per tile, splitting and thumbnail on),
so a photo turns into as many image tokens as with `LiquidAI/LFM2-VL-450M` (300x200: 70;
1600x1200: 1,770). The tokenizer is the demo's small local one (the vocabulary the model embeds is
still the real 65,536), and the folder loads through `from_pretrained` like any checkpoint, e.g. as
a `models` override for the `lfm2-vl-450m` partition.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from car_maker_pipeline.offline.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, IM_END_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from car_maker_pipeline.storage import atomic_directory

# Published shapes (LFM2 language models behind each LFM2-VL size, SigLIP2 NaFlex vision towers).
REAL_SHAPES: dict[str, dict] = {
    "450m": {
        "text": {"hidden_size": 1024, "intermediate_size": 4608, "num_attention_heads": 16, "num_key_value_heads": 8,
                 "layer_types": [2, 5, 8, 10, 12, 14], "num_hidden_layers": 16},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "projector_hidden_size": 2048, "projector_use_layernorm": False,
    },
    "1.6b": {
        "text": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "layer_types": [2, 5, 8, 10, 12, 14], "num_hidden_layers": 16},
        "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16},
        "projector_hidden_size": 2048, "projector_use_layernorm": False,
    },
    "3b": {
        "text": {"hidden_size": 2048, "intermediate_size": 10752, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "layer_types": [2, 5, 9, 13, 17, 21, 24, 27], "num_hidden_layers": 30},
        "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16},
        "projector_hidden_size": 2560, "projector_use_layernorm": True,
    },
}  # fmt: skip
REAL_VOCAB_SIZE = 65_536
MARKER_FILE = "real_shape_model.json"


def real_shape_config(shape: str, tokenizer):
    """`Lfm2VlConfig` with the published sizes of `shape` and token ids from `tokenizer`."""
    from transformers import Lfm2VlConfig

    if shape not in REAL_SHAPES:
        raise ValueError(f"Unknown LFM2-VL shape {shape!r}; use one of {', '.join(REAL_SHAPES)}.")
    spec = REAL_SHAPES[shape]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD_TOKEN, BOS_TOKEN, IM_END_TOKEN, IMAGE_TOKEN)}
    text = dict(spec["text"])
    attention = set(text.pop("layer_types"))
    text.update(
        model_type="lfm2",
        vocab_size=REAL_VOCAB_SIZE,
        layer_types=["full_attention" if i in attention else "conv" for i in range(text["num_hidden_layers"])],
        block_auto_adjust_ff_dim=False,
        max_position_embeddings=128_000,
        pad_token_id=ids[PAD_TOKEN],
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[IM_END_TOKEN],
        tie_word_embeddings=True,
    )
    vision = dict(spec["vision"], model_type="siglip2_vision_model", patch_size=16, num_patches=256)
    vision["vision_use_head"] = False
    return Lfm2VlConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_TOKEN],
        projector_hidden_size=spec["projector_hidden_size"],
        projector_use_layernorm=spec["projector_use_layernorm"],
        downsample_factor=2,
        tie_word_embeddings=True,
    )


def build_real_shape_model(out_dir: str | os.PathLike, shape: str = "450m", seed: int = 0) -> Path:
    """Write a random-weight LFM2-VL of `shape` (bf16 safetensors) and its processor to `out_dir`, once."""
    import torch
    from transformers import AutoModelForImageTextToText, Lfm2VlImageProcessor, Lfm2VlProcessor

    from car_maker_pipeline.offline.tokenizer import build_tokenizer

    out = Path(out_dir)
    if (out / MARKER_FILE).exists():
        return out
    with atomic_directory(out) as tmp:
        tokenizer = build_tokenizer()
        # The image processor's defaults are LFM2-VL's own (tiles, thumbnail, 64..256 tokens per tile).
        processor = Lfm2VlProcessor(
            image_processor=Lfm2VlImageProcessor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
        )
        config = real_shape_config(shape, tokenizer)
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        parameters = sum(p.numel() for p in model.parameters())
        (tmp / MARKER_FILE).write_text(json.dumps({"shape": shape, "seed": seed, "parameters": parameters}))
    return out
