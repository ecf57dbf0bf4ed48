"""Image bytes that are not usable images, made byte by byte, for the serving tests.

Each one is small: a decompression bomb here is a valid header that declares billions of pixels,
not billions of pixels.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encoded(size=(64, 48), fmt="JPEG", mode="RGB", color=(200, 30, 30), exif=None) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size, color if mode != "L" else 128)
    image.save(buffer, format=fmt, **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header for width x height RGB, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    data = bytearray(encoded())
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated(data: bytes) -> bytes:
    """The first half: a transfer cut off mid-file."""
    return data[: len(data) // 2]


def rotated_jpeg(size=(64, 48)) -> bytes:
    """A JPEG stored landscape with EXIF orientation 6 (display rotated 90 degrees: portrait)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(size, exif=exif.tobytes())


def large_png(width: int, height: int, color=(90, 120, 150)) -> bytes:
    """A one-colour PNG of width x height: a few KB on the wire, width x height x 3 bytes once decoded."""
    return encoded((width, height), fmt="PNG", color=color)


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    """A PNG of random pixels: incompressible, so the file is about width x height x 3 bytes."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def padded_png(total_bytes: int) -> bytes:
    """A valid small PNG of `total_bytes`: a private ancillary chunk after the pixels carries the rest."""
    image = encoded((32, 32), fmt="PNG")
    body, end = image[:-12], image[-12:]  # the IEND chunk is the last 12 bytes
    padding = total_bytes - len(image) - 12
    return body + _png_chunk(b"prVt", b"\0" * max(padding, 0)) + end
