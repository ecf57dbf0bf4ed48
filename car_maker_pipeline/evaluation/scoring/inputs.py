"""The evaluator's input side: stored pictures, cost-bounded batches, and batches prepared ahead.

Preparing a batch (reading the bytes, decoding, RGB and padding, LFM2-VL's image processor) is CPU
work that does not need the model, so `prefetched` can run it in a small pool of threads, a bounded
number of batches ahead of the model, and hand the batches back in order.

Why threads and not a torch `DataLoader` with worker processes: the expensive parts (Pillow's JPEG
decoder, the processor's torch resizes) release the GIL, so threads run them in parallel; a thread
shares the evaluator's memory, so nothing is pickled (a window of compressed photos, every batch's
pixels) and no process holding the model and an MLflow monitor thread is forked at every evaluation
(a 36-image validation split is evaluated at every checkpoint); and a thread may use CUDA (pinned
memory, or the processor on the GPU), which a forked worker cannot. Order and the memory bound are
explicit: at most `depth` prepared batches wait, consumed in submission order.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from car_maker_pipeline.model_inputs.image_tokens import draft_size
from car_maker_pipeline.model_inputs.images import padded_size

Job = TypeVar("Job")
Prepared = TypeVar("Prepared")


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


def opened(image, image_processor=None) -> Image.Image:
    """A decoded picture as is; a stored one (`StoredPicture`, or any other with `size` and `open()`) opened now.

    With `image_processor`, a stored JPEG that the processor will shrink anyway is decoded at a reduced
    size (`Image.draft`, libjpeg's DCT scaling) wherever `draft_size` says the processor treats it
    exactly as the full picture: same tiles, same image tokens, only downscaling.
    """
    if isinstance(image, Image.Image):
        return image
    picture = image.open()
    if image_processor is not None and picture.format == "JPEG" and padded_size(*picture.size) == picture.size:
        reduced = draft_size(image_processor, *picture.size)
        if reduced is not None:
            picture.draft(None, reduced)
    return picture


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


def prefetched(jobs: Iterable[Job], prepare: Callable[[Job], Prepared], workers: int, depth: int) -> Iterator[Prepared]:
    """`prepare(job)` of every job, in the order of `jobs`, computed by `workers` threads up to `depth`
    jobs ahead of the one the caller is using (`workers=0`: one at a time in the caller's thread).

    `jobs` is read lazily, only as far as the look-ahead needs. At most `depth` prepared results wait
    besides the one handed out, so memory stays bounded whatever the number of jobs; an error in
    `prepare` is raised here, at its job's turn, and a caller that stops early cancels what is queued.
    """
    if workers <= 0:
        for job in jobs:
            yield prepare(job)
        return
    depth = max(1, depth)
    pending: deque = deque()
    source = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare-batch")
    try:
        for job in source:
            pending.append(pool.submit(prepare, job))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            for job in source:  # refill before handing out, so a worker is busy while the caller runs
                pending.append(pool.submit(prepare, job))
                break
            yield result
            del result  # the caller's batch goes with the caller, not with this frame
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
