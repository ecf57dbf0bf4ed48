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


def decode_image(data: bytes | bytearray | memoryview | None) -> Image.Image:
    """The decoded picture (first frame, upright), or ImageInputError naming the problem."""
    if data is None or len(data) == 0:
        raise ImageInputError("the image is empty (0 bytes); send the bytes of a JPEG, PNG or other image file")
    data = bytes(data)
    try:
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
