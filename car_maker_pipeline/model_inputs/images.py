"""The picture a model sees: one rule for the data step, evaluation and training alike.

Training and evaluation must prepare images identically, or the model is scored on inputs it never
saw; the data step uses the same RGB conversion when it hashes and re-encodes pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels for any mode: alpha composited on white, 16-bit scaled, palette expanded."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32)
        peak = max(int(array.max()), 1)
        image = Image.fromarray((array * 255 // peak).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# LFM2-VL's processor gives a 500:1 strip a different patch count than a photo, and batching the two
# fails inside the model; padding extreme strips to this ratio keeps every image batchable.
MAX_ASPECT_RATIO = 8.0


def model_ready(image: Image.Image) -> Image.Image:
    """The picture a model sees: RGB (`to_rgb`), and no more elongated than 8:1 (padded with white)."""
    image = to_rgb(image)
    width, height = image.size
    if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
        return image
    size = (
        (width, max(height, int(np.ceil(width / MAX_ASPECT_RATIO))))
        if width > height
        else (max(width, int(np.ceil(height / MAX_ASPECT_RATIO))), height)
    )
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas
