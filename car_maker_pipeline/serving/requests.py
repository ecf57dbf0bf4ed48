"""What one prediction request may hold, and each row's value turned into image bytes, or refused naming the row.

The pyfunc model is called in process with whatever a caller puts in the `image` column, and by
MLflow's scoring server with whatever its parser made of the request. The same image reaches it as:

| sent as                                                        | arrives as                              |
|----------------------------------------------------------------|-----------------------------------------|
| Python `bytes` / `bytearray` / `memoryview`                    | the bytes                               |
| Python `str` of base64 text; a `{"b64": text}` dict            | the text, the dict                      |
| JSON `dataframe_split` / `dataframe_records`, base64 text      | the bytes (MLflow decodes base64)       |
| JSON `instances` / `inputs`, base64 text                       | the base64 text as bytes (not decoded)  |
| JSON `instances` / `inputs`, `{"b64": text}`                   | the dict's Python repr as bytes         |
| CSV (`text/csv`), base64 text                                  | the text                                |
| Parquet, a binary column                                       | the bytes                               |

So a value is the image's bytes when Pillow identifies them, else base64 text (alone or in a
`{"b64": ...}` wrapper) decoded once; anything else is refused with the row and the accepted forms,
and the same image gets the same answer whichever way it came. A null row, a number or a file path
are refused by name: the model never opens files.

Bounds (the scoring server reads a whole body before the model sees it, so these are checked before
any image is decoded): at most MAX_REQUEST_ROWS rows and MAX_REQUEST_BYTES image bytes per request,
and MAX_IMAGE_BYTES per image (`images.py`). A larger batch is split by the caller.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

import numpy as np

from car_maker_pipeline.serving.images import MAX_IMAGE_BYTES, ImageInputError, check_header

MAX_REQUEST_ROWS = 128  # images per request: about 0.5 s of tiny-s on 2 CPU cores, seconds for 450M on a GPU
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # image bytes per request, summed (a JSON body is a third larger: base64)
ACCEPTED_FORMS = (
    "one image per row in column 'image': in Python the file's bytes (or base64 text); over HTTP "
    'base64 text in dataframe_split or dataframe_records, base64 text or {"b64": text} in instances or '
    "inputs, base64 text in CSV, raw bytes in Parquet"
)
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")
_B64_WRAPPER = re.compile(r"""\{\s*['"]b64['"]\s*:\s*['"]([A-Za-z0-9+/=\s]*)['"]\s*\}""")


class RequestError(ValueError):
    """A request the model cannot take as a whole (too many rows or bytes); the message says the bound."""


def _null(value) -> bool:
    """None, NaN (Python or NumPy float) or pandas' NA/NaT: what a missing cell holds."""
    if value is None or isinstance(value, (float, np.floating)) and np.isnan(value):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def _from_base64(text: bytes) -> bytes | None:
    """The decoded bytes of strict base64 text (whitespace and line breaks allowed), else None."""
    if not _BASE64.fullmatch(text):
        return None
    try:
        return base64.b64decode(re.sub(rb"\s", b"", text), validate=True)
    except (binascii.Error, ValueError):
        return None


def _unwrapped(value) -> bytes | None:
    """The base64 text inside `{"b64": text}`: as a dict, or as the text MLflow makes of one."""
    if isinstance(value, dict):
        inner = value.get("b64") if set(value) == {"b64"} else None
        return inner.encode() if isinstance(inner, str) else None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    match = _B64_WRAPPER.fullmatch(text.strip()) if isinstance(text, str) and len(text) < 2 * MAX_IMAGE_BYTES else None
    return match[1].encode() if match else None


def _describe(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _as_text(raw: bytes) -> str | None:
    """The bytes as text when they are printable text (a short one: what a path or a name sent as bytes is)."""
    try:
        text = raw[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(raw) <= 4096 and text.isprintable() else None


def _not_an_image_text(value: str, row: str) -> ImageInputError:
    hint = (
        "; it looks like a file path, and the model does not open files: send the file's bytes "
        "(open(path, 'rb').read())"
        if "/" in value or "\\" in value or "." in value[-6:]
        else ""
    )
    return ImageInputError(
        f"{row} is text, not an image, nor base64 or {{'b64': base64}} of one ({_describe(value)}){hint}; "
        f"send {ACCEPTED_FORMS}"
    )


def row_image(value, row: str) -> bytes:
    """The image bytes a row holds (see the module docstring), or ImageInputError naming `row` and what to send."""
    if _null(value):
        raise ImageInputError(f"{row} is empty (null); send {ACCEPTED_FORMS}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            check_header(raw)
            return raw
        except ImageInputError as problem:
            wrapped = _unwrapped(raw)
            decoded = _from_base64(wrapped if wrapped is not None else raw) if len(raw) > 0 else None
            if decoded is not None:
                return _checked_decoded(decoded, row)
            text = _as_text(raw) if len(raw) > 0 else None
            raise (_not_an_image_text(text, row) if text else ImageInputError(f"{row}: {problem}")) from None
    if isinstance(value, (str, dict)):
        wrapped = _unwrapped(value)
        text = wrapped if wrapped is not None else value.encode("utf-8", "replace") if isinstance(value, str) else None
        decoded = _from_base64(text) if text else None
        if decoded is None:
            raise _not_an_image_text(value if isinstance(value, str) else repr(value), row)
        return _checked_decoded(decoded, row)
    raise ImageInputError(
        f"{row} holds a value of type {type(value).__name__} ({_describe(value)}), not an image; send {ACCEPTED_FORMS}"
    )


def _checked_decoded(decoded: bytes, row: str) -> bytes:
    try:
        check_header(decoded)
    except ImageInputError as problem:
        raise ImageInputError(f"{row} (base64 text, decoded to {len(decoded):,} bytes): {problem}") from None
    return decoded


def check_request_size(rows: int) -> None:
    if rows > MAX_REQUEST_ROWS:
        raise RequestError(
            f"the request holds {rows:,} images, over the limit of {MAX_REQUEST_ROWS} per request; "
            f"send them in requests of at most {MAX_REQUEST_ROWS}"
        )


def request_images(values: Sequence, labels: Sequence[str]) -> list[bytes]:
    """Each row's image bytes (`labels` name the rows in messages), within the request's bounds.

    The bytes are summed as rows are read, so a request over MAX_REQUEST_BYTES is refused at the row
    that crosses it, before any image is decoded.
    """
    check_request_size(len(values))
    images, total = [], 0
    for value, label in zip(values, labels):
        size = len(value) if isinstance(value, (bytes, bytearray, memoryview, str)) else 0
        if size > MAX_IMAGE_BYTES * 4 // 3 + 4:  # base64 text of the largest image allowed
            raise ImageInputError(f"{label}: {size:,} bytes is over the {MAX_IMAGE_BYTES:,}-byte limit for one image")
        image = row_image(value, label)
        total += len(image)
        if total > MAX_REQUEST_BYTES:
            raise RequestError(
                f"the request's images add up to more than {MAX_REQUEST_BYTES:,} bytes (the limit per request) "
                f"by {label}; send fewer images per request"
            )
        images.append(image)
    return images
