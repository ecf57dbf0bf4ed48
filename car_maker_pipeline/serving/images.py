"""Image bytes from outside the pipeline, decoded once under the data step's rules, or refused with the reason.

The served model, the `classify` command and the batch predictions all receive images nobody has
checked: empty uploads, text files, JPEGs cut off mid-transfer, and headers that announce billions
of pixels to make the server allocate them (decompression bombs). Each of these is refused here with
a message that names the problem, before any pixel is decoded where the header already tells, and
an accepted image is upright (EXIF orientation applied) as the training images were.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from car_maker_pipeline.model_inputs.images import MAX_IMAGE_PIXELS, size_problem, to_rgb


class ImageInputError(ValueError):
    """Bytes that are not a usable image; the message says what is wrong with them."""


# The bytes one image file may have. A car photo is a few MB; the bound is checked from the file's
# size (or the request's length) before a byte of it is read, so a 2 GB upload never reaches memory.
MAX_IMAGE_BYTES = 50 * 1024 * 1024


def _opened(data: bytes) -> Image.Image:
    """The image Pillow opens (header only, no pixel decoded), refused when its size costs too much."""
    with warnings.catch_warnings():
        # Pillow only warns between its own limits; the pixel bound below is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(io.BytesIO(data))
    width, height = opened.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageInputError(_bomb_message(f"{width}x{height} = {width * height:,}"))
    problem = size_problem(width, height)  # e.g. an 8,000,000 x 8 strip, refused from its header
    if problem is not None:
        raise ImageInputError(f"image refused: {problem}; crop or resize it")
    return opened


def check_header(data: bytes | bytearray | memoryview | None) -> tuple[int, int]:
    """(width, height) that the header declares, or ImageInputError; no pixel is decoded, so a
    truncated body passes here and is caught by `decode_image`."""
    return _decode(data, load=False).size


def decode_image(data: bytes | bytearray | memoryview | None) -> Image.Image:
    """The decoded picture (first frame, upright), or ImageInputError naming the problem."""
    return _decode(data, load=True)


def _decode(data, *, load: bool) -> Image.Image:
    if data is None or len(data) == 0:
        raise ImageInputError("the image is empty (0 bytes); send the bytes of a JPEG, PNG or other image file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageInputError(f"{len(data):,} bytes is over the {MAX_IMAGE_BYTES:,}-byte limit for one image")
    data = bytes(data)
    try:
        opened = _opened(data)
        if not load:
            return opened
        opened.load()  # first frame of an animation; raises on truncated or corrupt data
    except ImageInputError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own guard, past twice its warning size
        declared = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageInputError(_bomb_message(f"{int(declared[1]):,}" if declared else "more")) from error
    except UnidentifiedImageError as error:
        raise ImageInputError(
            f"not an image: Pillow cannot identify these {len(data):,} bytes as any image format; "
            "send the bytes of a JPEG, PNG or other image file"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageInputError(
            f"truncated or corrupt image data ({type(error).__name__}: {error}); send the whole file"
        ) from error
    if opened.getexif().get(0x0112, 1) not in (0, 1):  # EXIF orientation: the data step stores photos upright
        opened = ImageOps.exif_transpose(opened)
    return opened


def _bomb_message(declared: str) -> str:
    return (
        f"decompression bomb refused: the header declares {declared} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
        "limit (a car photo is under 1 Mpx); resize the image"
    )


def encode_png(image: Image.Image) -> bytes:
    """Lossless bytes of a decoded picture (as the model sees its colours), for callers that hold pixels."""
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PNG")
    return buffer.getvalue()
