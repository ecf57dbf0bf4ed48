"""Label Studio's task and export formats, as far as an image-classification project uses them.

Facts from Label Studio's documentation (guide/task_format, guide/export, guide/predictions):

- A task is `{"data": {"image": <url>}, "predictions": [...]}`; a prediction is
  `{"model_version", "score", "result": [{"from_name", "to_name", "type": "choices",
  "value": {"choices": [<label>]}}]}`, which the labeling interface shows pre-selected.
- The JSON export is a list of tasks, each with `annotations`: `{"result": [...same shape...],
  "was_cancelled": bool}`; a skipped task has `was_cancelled: true` (or no annotation at all).
- `data.image` may be an http(s) URL, an uploaded file (`/data/upload/<project>/<prefix>-<name>`),
  a local-storage file (`/data/local-files/?d=<path>`) or a `data:` URI with the image inline.

The review queue writes its images inline (`data:` URIs), so a reviewed export is a whole batch by
itself: it can be dropped into the additions folder as one file, with no path to resolve.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

FROM_NAME, TO_NAME = "maker", "image"  # the control and object tag names of LABEL_CONFIG


def label_config(choices: list[str]) -> str:
    """The labeling interface: one image, one required choice among `choices`."""
    options = "\n".join(f'    <Choice value="{_xml(choice)}"/>' for choice in choices)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" required="true">\n'
        f"{options}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def task(image: str, data: dict, choice: str | None, score: float | None, model_version: str) -> dict:
    """One import task: the image, extra data fields, and the model's answer pre-filled as a prediction."""
    prepared = {"data": {"image": image, **data}}
    if choice:
        result = {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [choice]}}
        prediction = {"model_version": model_version, "result": [result]}
        if score is not None:
            prediction["score"] = float(score)
        prepared["predictions"] = [prediction]
    return prepared


@dataclass(frozen=True)
class ExportedRow:
    """One task of an export: where its image is, and its label or why it has none."""

    reference: str  # data.image as exported (a data: URI is shortened for display)
    image: str  # data.image in full
    label: str | None
    problem: str | None  # skipped, no choice, several choices


def exported_rows(tasks: list) -> list[ExportedRow]:
    """Each exported task's image and its one chosen label (or the problem, for the refused-rows table).

    The last non-cancelled annotation counts (Label Studio lists them oldest first).
    """
    rows = []
    for position, item in enumerate(tasks):
        if not isinstance(item, dict) or not isinstance(item.get("data"), dict):
            rows.append(ExportedRow(f"task {position}", "", None, "not a task (no 'data' object)"))
            continue
        image = item["data"].get("image")
        image = image if isinstance(image, str) else ""
        shown = image if not image.startswith("data:") else f"task {item.get('id', position)} (inline image)"
        kept = [a for a in item.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not kept:
            rows.append(ExportedRow(shown, image, None, "skipped: the task has no annotation that was not cancelled"))
            continue
        choices = [
            choice
            for region in kept[-1].get("result") or []
            if isinstance(region, dict) and region.get("type") == "choices"
            for choice in (region.get("value") or {}).get("choices") or []
        ]
        if len(choices) != 1:
            problem = "no choice was made" if not choices else f"{len(choices)} choices were made ({choices})"
            rows.append(ExportedRow(shown, image, None, problem))
            continue
        rows.append(ExportedRow(shown, image, str(choices[0]), None))
    return rows


class InlineImageError(ValueError):
    """A `data:` URI that does not hold base64 image bytes."""


def inline_bytes(image: str, limit: int) -> bytes:
    """The bytes of a `data:` URI image, refused above `limit` before decoding."""
    header, _, payload = image.partition(",")
    if not header.endswith(";base64"):
        raise InlineImageError("an inline image that is not base64-encoded")
    if len(payload) * 3 // 4 > limit:
        raise InlineImageError(
            f"an inline image of about {len(payload) * 3 // 4:,} bytes, over the {limit:,}-byte limit"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InlineImageError(f"an inline image whose base64 does not decode ({error})") from None


def file_reference(image: str) -> str | None:
    """The relative path a non-inline `data.image` names inside the export's folder, or None for a remote URL.

    Local-storage files give their `d` path; uploads and other server paths their file name (Label
    Studio prefixes uploads with a random id and a dash, which is kept: copy the files as exported).
    """
    parts = urlsplit(image)
    if parts.scheme in ("http", "https", "s3", "gs", "azure-blob"):
        return None
    if "d" in parse_qs(parts.query):
        return unquote(parse_qs(parts.query)["d"][0])
    if parts.path.startswith("/data/"):
        return posixpath.basename(unquote(parts.path))
    return unquote(parts.path)
