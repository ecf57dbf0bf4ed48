"""The evaluator's input side: stored pictures, read lazily, and cost-bounded batches of them."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from car_maker_pipeline.model_inputs.images import padded_size


@dataclass(frozen=True)
class StoredPicture:
    """An image file as stored (bytes or a path): its size read from the header, its pixels decoded
    only when its batch runs and dropped with the batch.

    Why not a lazily opened `PIL.Image`: once its batch decodes it, the image object keeps the
    pixels for as long as it lives, so a sorting window of 2,048 realistic photos held them all
    (6.7 GB for 1,005 test pictures, measured) although each batch needed only its own.
    """

    data: bytes | None
    path: str | None
    size: tuple[int, int]

    @classmethod
    def of(cls, cell: dict) -> StoredPicture:
        data, path = cell.get("bytes") or None, cell.get("path")
        with Image.open(io.BytesIO(data) if data else path) as header:
            return cls(data, None if data else path, header.size)

    def open(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data) if self.data else self.path)


def ready_size(image) -> tuple[int, int]:
    """The size `model_ready` will give `image`, from its header (stored pictures are within the limits)."""
    return padded_size(*image.size)


def opened(image) -> Image.Image:
    """A decoded picture as is; a stored one (`StoredPicture`, or any other with `size` and `open()`) opened now."""
    return image if isinstance(image, Image.Image) else image.open()


def pixel_bounded_batches(
    ordered: Sequence[int], sizes: dict[int, tuple[int, int]], batch_size: int, max_pixels: int
) -> list[list[int]]:
    """`ordered` cut into consecutive batches of at most `batch_size` pictures and `max_pixels`
    decoded pixels (`sizes[i]`: picture i's width and height); a picture alone may exceed it."""
    batches: list[list[int]] = []
    batch, pixels = [], 0
    for index in ordered:
        area = sizes[index][0] * sizes[index][1]
        if batch and (len(batch) == batch_size or pixels + area > max_pixels):
            batches.append(batch)
            batch, pixels = [], 0
        batch.append(index)
        pixels += area
    if batch:
        batches.append(batch)
    return batches
