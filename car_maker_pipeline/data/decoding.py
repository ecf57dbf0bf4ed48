"""Decode a source image once, or say why it cannot be used.

Each image is decoded exactly once: that decode proves it is readable, yields its RGB pixels for a
content hash, and, when the stored bytes are not already an RGB JPEG/PNG, the RGB re-encoding.
An image is refused before any pixel is decoded when its header announces more work than
`model_inputs.images.size_problem` allows (a decompression bomb, or a strip so elongated that
padding it for the model would need a canvas of terabytes).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from car_maker_pipeline.model_inputs.images import size_problem, to_rgb

# Why a row is dropped: the `reason` column of the dropped-rows table (its `detail` says more).
UNDECODABLE = "undecodable"
TOO_LARGE = "too large"
BAD_LABEL = "bad label"
DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Refusal:
    """An image that is not used: the reason (one of the constants above) and the specifics."""

    reason: str
    detail: str


def decode_checked(data: bytes | None) -> tuple[bytes, str] | Refusal:
    """(RGB-ready encoded bytes, pixel hash), or the Refusal saying why the bytes cannot be used."""
    if not data:
        return Refusal(UNDECODABLE, "no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            problem = size_problem(opened.width, opened.height)
            if problem:
                return Refusal(TOO_LARGE, problem)
            opened.load()  # first frame of an animation; raises on truncated data
            rotated = opened.getexif().get(0x0112, 1) not in (0, 1)  # EXIF orientation tag
            rgb = to_rgb(ImageOps.exif_transpose(opened) if rotated else opened)
            pixel_hash = hashlib.blake2b(rgb.tobytes(), digest_size=16)
            pixel_hash.update(f"{rgb.width}x{rgb.height}".encode())
            if rgb is opened and opened.format in ("JPEG", "PNG"):
                encoded = data  # already an upright RGB JPEG/PNG: keep the original bytes, no re-encode
            else:
                buffer = io.BytesIO()
                rgb.save(buffer, format="PNG")  # lossless, so the one conversion is the only change
                encoded = buffer.getvalue()
            return encoded, pixel_hash.hexdigest()
    except UnidentifiedImageError:
        return Refusal(UNDECODABLE, f"not an image format Pillow reads ({len(data):,} bytes)")
    except Image.DecompressionBombError as error:
        return Refusal(TOO_LARGE, str(error))
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return Refusal(UNDECODABLE, f"{type(error).__name__}: {error}"[:200])


def decode_once(data: bytes) -> tuple[bytes, str] | None:
    """(RGB-ready encoded bytes, pixel hash), or None when the bytes are not a usable image."""
    decoded = decode_checked(data)
    return None if isinstance(decoded, Refusal) else decoded
