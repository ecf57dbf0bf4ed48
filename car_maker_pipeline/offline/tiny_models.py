"""Tiny random-weight LFM2-VL models for the offline demo profile and the tests.

They are built from transformers' own `Lfm2VlConfig` (a SigLIP2 vision tower, a pixel-unshuffle
projector and an LFM2 language model mixing short-conv and full-attention blocks) and saved as
ordinary model directories, so everything downstream loads them exactly like
`LiquidAI/LFM2-VL-450M`:

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)

What mirrors the real checkpoints:
- special tokens `<|pad|>`, `<|startoftext|>`, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  `<image>`, `<|image_start|>`, `<|image_end|>`, `<|img_thumbnail|>`, `<|img_row_R_col_C|>`;
  bos `<|startoftext|>`, eos `<|im_end|>`, pad `<|pad|>`;
- a ChatML chat template (`chat_template.jinja`) that renders `{"type": "image"}` parts as `<image>`;
- `Lfm2VlProcessor` + `Lfm2VlImageProcessor`, `config.image_token_id` == the `<image>` id.

What is deliberately different, so that LoRA can teach a random network the demo task on a CPU
within minutes:
- a byte-level BPE tokenizer trained locally on the prompt, the Stanford Cars class/maker names and
  some generic English (vocabulary 1024);
- no image splitting, 8-pixel encoder patches and 16..48 image tokens: a 128x96 picture keeps its
  native resolution (48 tokens = 6x8 blocks of 2x2 patches). With 20 image tokens learning was much
  slower: at initialisation the answer position sees the image only through near-uniform
  attention, so the image's share of the attended tokens sets how much image signal the first
  gradients carry;
- language models with more attention than short-conv blocks (LFM2-VL-450M has 6 of 16): only
  attention carries the picture across the ~50 prompt tokens that separate it from the answer;
  with half the blocks attention, tiny-s needed far more steps to beat chance;
- text initializer range 0.2 instead of 0.02: with the default scale the random network is so
  flat that LoRA barely moves it (0.1 and 0.35 both learned more slowly than 0.2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from car_maker_pipeline.offline.generation_cache import via_cache
from car_maker_pipeline.offline.tokenizer import (
    BOS_TOKEN,
    DOWNSAMPLE_FACTOR,
    ENCODER_PATCH_SIZE,
    IM_END_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    VISION_NUM_PATCHES,
    build_processor,
)
from car_maker_pipeline.storage import remove_stale_temporaries, temporary_prefix

# --------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of one tiny LFM2-VL. `layer_types` mixes LFM2's short-conv and attention blocks."""

    text_hidden_size: int
    text_intermediate_size: int
    text_layer_types: tuple[str, ...]
    text_num_attention_heads: int
    text_num_key_value_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_layers: int
    vision_num_attention_heads: int
    projector_hidden_size: int
    text_initializer_range: float = 0.2


TINY_MODEL_SPECS: dict[str, TinyModelSpec] = {
    "tiny-s": TinyModelSpec(
        text_hidden_size=64,
        text_intermediate_size=128,
        text_layer_types=("conv", "full_attention", "full_attention", "full_attention"),
        text_num_attention_heads=4,
        text_num_key_value_heads=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_layers=2,
        vision_num_attention_heads=2,
        projector_hidden_size=64,
    ),
    "tiny-m": TinyModelSpec(
        text_hidden_size=96,
        text_intermediate_size=192,
        text_layer_types=("conv", "full_attention", "full_attention", "conv", "full_attention", "full_attention"),
        text_num_attention_heads=4,
        text_num_key_value_heads=2,
        vision_hidden_size=48,
        vision_intermediate_size=96,
        vision_num_layers=3,
        vision_num_attention_heads=4,
        projector_hidden_size=96,
    ),
    "tiny-l": TinyModelSpec(
        text_hidden_size=128,
        text_intermediate_size=256,
        text_layer_types=(
            "conv",
            "full_attention",
            "full_attention",
            "conv",
            "full_attention",
            "full_attention",
            "conv",
            "full_attention",
        ),
        text_num_attention_heads=4,
        text_num_key_value_heads=2,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_num_layers=4,
        vision_num_attention_heads=4,
        projector_hidden_size=128,
    ),
}


def build_config(name: str, tokenizer):
    """`Lfm2VlConfig` for one of `TINY_MODEL_SPECS`, with token ids taken from `tokenizer`."""
    from transformers import Lfm2VlConfig

    spec = _spec(name)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD_TOKEN, BOS_TOKEN, IM_END_TOKEN, IMAGE_TOKEN)}
    text_config = {
        "model_type": "lfm2",
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden_size,
        "intermediate_size": spec.text_intermediate_size,
        "block_auto_adjust_ff_dim": False,  # else the MLP width is rounded up to a multiple of 256
        "num_hidden_layers": len(spec.text_layer_types),
        "layer_types": list(spec.text_layer_types),
        "num_attention_heads": spec.text_num_attention_heads,
        "num_key_value_heads": spec.text_num_key_value_heads,
        "max_position_embeddings": 4096,
        "initializer_range": spec.text_initializer_range,
        "pad_token_id": ids[PAD_TOKEN],
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[IM_END_TOKEN],
        "tie_word_embeddings": True,
    }
    vision_config = {
        "model_type": "siglip2_vision_model",
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_hidden_layers": spec.vision_num_layers,
        "num_attention_heads": spec.vision_num_attention_heads,
        "patch_size": ENCODER_PATCH_SIZE,
        "num_patches": VISION_NUM_PATCHES,
        "vision_use_head": False,
    }
    return Lfm2VlConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_TOKEN],
        projector_hidden_size=spec.projector_hidden_size,
        projector_use_layernorm=False,
        downsample_factor=DOWNSAMPLE_FACTOR,
        tie_word_embeddings=True,
    )


# --------------------------------------------------------------------------------------------
# Building and saving
# --------------------------------------------------------------------------------------------

MARKER_FILE = "tiny_model.json"  # written last: its presence means the directory is complete
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE)


def _spec(name: str) -> TinyModelSpec:
    try:
        return TINY_MODEL_SPECS[name]
    except KeyError:
        raise ValueError(f"Unknown tiny model {name!r}; choose one of {sorted(TINY_MODEL_SPECS)}.") from None


def is_complete_tiny_model(model_dir: str | os.PathLike) -> bool:
    path = Path(model_dir)
    return all((path / f).is_file() for f in _REQUIRED_FILES)


def build_tiny_model(out_dir: str | os.PathLike, name: str = "tiny-s", seed: int = 0) -> Path:
    """Write the tiny LFM2-VL `name` (weights drawn with `seed`) and its processor to `out_dir`.

    The model is written to a temporary sibling directory and renamed into place, so `out_dir` is
    either absent or complete. If `out_dir` already holds a complete tiny model built with the same
    name and seed it is returned as is; one built with another name or seed is an error, as is a
    non-empty directory that is not a tiny model. The same seed always gives byte-identical weights.
    """
    spec = _spec(name)
    out = Path(out_dir)
    if out.exists():
        if is_complete_tiny_model(out):
            _check_marker(out, name, seed)
            return out
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists, is not empty and holds no complete tiny model; remove it or choose another directory."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)  # a build killed mid-write leaves its folder behind
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out.name), dir=out.parent))
    try:
        _write_model(tmp, name, spec, seed)
        try:
            if out.exists():
                out.rmdir()  # only an empty directory gets here
            os.rename(tmp, out)
        except OSError:
            # Someone else finished the same build first.
            if not is_complete_tiny_model(out):
                raise
            _check_marker(out, name, seed)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_marker(out: Path, name: str, seed: int) -> None:
    marker = json.loads((out / MARKER_FILE).read_text())
    if marker.get("name") != name or marker.get("seed") != seed:
        raise ValueError(
            f"{out} already holds tiny model {marker.get('name')!r} built with seed {marker.get('seed')}, "
            f"not {name!r} with seed {seed}. Use another directory or remove this one."
        )


def _write_model(path: Path, name: str, spec: TinyModelSpec, seed: int) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    processor = build_processor()
    tokenizer = processor.tokenizer
    config = build_config(name, tokenizer)

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)

    n_params = sum(p.numel() for p in model.parameters())
    weights_sha256 = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    marker = {
        "name": name,
        "seed": seed,
        "spec": asdict(spec),
        "num_parameters": n_params,
        "weights_sha256": weights_sha256,
    }
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def ensure_demo_model(parent: Path, name: str, seed: int = 0) -> Path:
    """The tiny model `name` under `parent`, built on first use (one folder per name and seed), or copied
    from the generation cache (`generation_cache.py`) when one is configured."""
    target = parent / f"{name}-seed{seed}"
    if target.exists():  # complete (checked against name and seed), or an error if it is something else
        return build_tiny_model(target, name, seed=seed)
    return via_cache(target, "models", lambda out: build_tiny_model(out, name, seed=seed))
