"""How the demo source's files are encoded, and the corrupted copies of test.

The real source mixes formats (mostly JPEG, some PNG, a few grayscale, CMYK and RGBA files), which
the pipeline's image normalisation must handle, and ships seven corrupted copies of its test split;
both are reproduced here, deterministically from per-image random generators.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# The corrupted test splits of `tanganke/stanford_cars`, in the order the Hub lists them.
ALL_CORRUPTIONS: tuple[str, ...] = (
    "contrast",
    "gaussian_noise",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "spatter",
)

# Written (hidden, so content fingerprints of the folder ignore it) to recognise a folder this module
# made: only such a folder is ever replaced; any other existing non-empty folder is left alone.

# File formats with their share of images, roughly as in the real data: mostly JPEG, some PNG,
# a few grayscale JPEG, CMYK JPEG and RGBA PNG files.
_FORMATS: tuple[tuple[str, float], ...] = (
    ("jpeg", 0.80),
    ("png", 0.12),
    ("jpeg_l", 0.03),
    ("jpeg_cmyk", 0.025),
    ("png_rgba", 0.025),
)
_FORMAT_CUMULATIVE = np.cumsum([share for _, share in _FORMATS])


# --------------------------------------------------------------------------------------------------
# Encoding and corruptions
# --------------------------------------------------------------------------------------------------


def pick_format(rng: np.random.Generator) -> tuple[str, int]:
    kind = _FORMATS[int(np.searchsorted(_FORMAT_CUMULATIVE, rng.random() * _FORMAT_CUMULATIVE[-1], side="right"))][0]
    return kind, int(rng.integers(72, 96))


def encode_image(image: Image.Image, kind: str, quality: int) -> bytes:
    """Encode an RGB image as `kind` (see `_FORMATS`); PIL's encoders are deterministic."""
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, "JPEG", quality=quality)
    elif kind == "png":
        image.save(buffer, "PNG", compress_level=3)
    elif kind == "jpeg_l":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    elif kind == "jpeg_cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif kind == "png_rgba":
        rgba = image.convert("RGBA")  # fully opaque: converting back to RGB loses nothing
        rgba.save(buffer, "PNG", compress_level=3)
    else:  # pragma: no cover - internal
        raise AssertionError(kind)
    return buffer.getvalue()


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean()
    return (x - mean) * 0.3 + mean


def _gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.standard_normal(x.shape, dtype=np.float32) * 0.12 * 255


def _impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(x.shape, dtype=np.float32)
    out = x.copy()
    out[u < 0.03] = 0.0
    out[u > 0.97] = 255.0
    return out


def _jpeg_compression(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=12)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32)


def _motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Average of shifted copies along a random direction (a line kernel), edges replicated."""
    h, w = x.shape[:2]
    length = max(3, round(min(h, w) * 0.08)) | 1
    theta = rng.uniform(0, math.pi)
    steps = np.linspace(-(length // 2), length // 2, length)
    pad = length // 2 + 1
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for s in steps:
        dx, dy = int(round(s * math.cos(theta))), int(round(s * math.sin(theta)))
        out += padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return out / len(steps)


def _pixelate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    image = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "RGB")
    small = image.resize((max(1, round(w * 0.3)), max(1, round(h * 0.3))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)


def _spatter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blobs of mud or water: smooth low-resolution noise, thresholded to cover about a sixth of the image."""
    h, w = x.shape[:2]
    coarse = rng.standard_normal((max(2, h // 8), max(2, w // 8))).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    threshold = np.quantile(field, 0.83)
    mask = np.clip((field - threshold) * 4.0, 0.0, 1.0)[..., None] * 0.85
    colour = np.array((70, 50, 30) if rng.random() < 0.5 else (150, 170, 185), np.float32)
    return x * (1 - mask) + colour * mask


_CORRUPTIONS = {
    "contrast": _contrast,
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "jpeg_compression": _jpeg_compression,
    "motion_blur": _motion_blur,
    "pixelate": _pixelate,
    "spatter": _spatter,
}
assert tuple(_CORRUPTIONS) == ALL_CORRUPTIONS


def corrupt_image(image: Image.Image, corruption: str, rng: np.random.Generator) -> Image.Image:
    """Apply one named corruption at moderate severity; returns an RGB image of the same size."""
    if corruption not in _CORRUPTIONS:
        raise ValueError(f"Unknown corruption {corruption!r}; valid corruptions are {', '.join(ALL_CORRUPTIONS)}.")
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = _CORRUPTIONS[corruption](x, rng)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
