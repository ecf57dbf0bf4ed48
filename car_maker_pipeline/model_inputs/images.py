"""The picture a model sees: one rule for the data step, evaluation and training alike.

Training and evaluation must prepare images identically, or the model is scored on inputs it never
saw; the data step uses the same RGB conversion when it hashes and re-encodes pixels, and the same
size bound when it decides which images to keep.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# The work one image may cost, in pixels of the picture the model is given (after padding, below).
# Pillow's own guard is ~89 Mpx (warning) / 179 Mpx (error); a real car photo is under 1 Mpx.
MAX_IMAGE_PIXELS = 64_000_000

# The decoded pixels one batch may hold. Batches are sorted by image tokens, so the largest photos
# (a 5,616 x 3,744 frame is 21 Mpx) land together: 32 of them would hold 670 Mpx decoded, and the
# processor's copies on top, about 5 GB, although the model sees each as the same capped tiles.
# A batch stops growing at this many pixels (one image is always allowed, up to MAX_IMAGE_PIXELS).
MAX_BATCH_PIXELS = 2 * MAX_IMAGE_PIXELS

# LFM2-VL's processor gives a 500:1 strip a different patch count than a photo, and batching the two
# fails inside the model; padding extreme strips to this ratio keeps every image batchable.
MAX_ASPECT_RATIO = 8.0


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


def padded_size(width: int, height: int) -> tuple[int, int]:
    """The canvas `model_ready` puts a width x height picture on: no more elongated than 8:1."""
    if max(width, height) <= MAX_ASPECT_RATIO * min(width, height):
        return width, height
    if width > height:
        return width, max(height, int(np.ceil(width / MAX_ASPECT_RATIO)))
    return max(width, int(np.ceil(height / MAX_ASPECT_RATIO))), height


def size_problem(width: int, height: int) -> str | None:
    """Why a picture of this size costs too much to prepare for a model, or None when it is fine.

    Pixel count alone is not enough: an 8,000,000 x 8 strip is 64 Mpx, but padded to 8:1 it would
    be a canvas of 8 Tpx. The bound is therefore on the padded canvas, known from the header alone.
    """
    if width < 1 or height < 1:
        return f"{width}x{height} has no pixels"
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width}x{height} is {width * height:,} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit"
    canvas_width, canvas_height = padded_size(width, height)
    if canvas_width * canvas_height > MAX_IMAGE_PIXELS:
        ratio = max(width, height) / min(width, height)
        return (
            f"{width}x{height} is elongated ({ratio:,.0f}:1); padded to {MAX_ASPECT_RATIO:g}:1 for the model it "
            f"would be {canvas_width}x{canvas_height} = {canvas_width * canvas_height:,} pixels, over the "
            f"{MAX_IMAGE_PIXELS:,}-pixel limit"
        )
    return None


def _shrunk_to_limit(image: Image.Image) -> Image.Image:
    """The image scaled down just enough that its padded canvas fits MAX_IMAGE_PIXELS (aspect kept)."""
    width, height = image.size
    scale = (MAX_IMAGE_PIXELS / math.prod(padded_size(width, height))) ** 0.5
    while True:  # padded_size rounds up, so the first guess can be a few pixels over
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        if math.prod(padded_size(*size)) <= MAX_IMAGE_PIXELS:
            return image.resize(size, Image.Resampling.BILINEAR)
        scale *= 0.99


def model_ready(image: Image.Image) -> Image.Image:
    """The picture a model sees: RGB (`to_rgb`), and no more elongated than 8:1 (padded with white).

    The data step drops every image whose canvas would exceed MAX_IMAGE_PIXELS (`size_problem`), so
    stored images pass unchanged; an image from elsewhere (the classify command) is scaled down first,
    so the canvas allocated here is bounded whatever the image's dimensions.
    """
    image = to_rgb(image)
    if min(image.size) >= 1 and size_problem(*image.size) is not None:
        image = _shrunk_to_limit(image)
    width, height = image.size
    size = padded_size(width, height)
    if size == (width, height):
        return image
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas
