"""How many image tokens a picture costs, and the budget that bounds it.

LFM2-VL's processor turns a picture into 64..256 tokens per 512 px tile, plus a thumbnail when it
splits, so a real photo costs anywhere from 70 tokens (300x200) to over 2,000 (4000x500). Two
things follow. The evaluator must know each picture's cost *before* it batches, to put pictures of
similar cost together (a left-padded batch computes every row at the length of the longest), and
the cost must be bounded and recorded: `ImageTokenBudget` holds the processor's own three
settings, travels with every run and registered model, and is applied to the processor before use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


class ImageTokenBudgetError(ValueError):
    """Budget settings the processor cannot honour."""


@dataclass(frozen=True)
class ImageTokenBudget:
    """The processor's image-token settings; None keeps what the model's processor ships with."""

    min_image_tokens: int | None = None
    max_image_tokens: int | None = None
    do_image_splitting: bool | None = None

    def __post_init__(self) -> None:
        low, high = self.min_image_tokens, self.max_image_tokens
        for name, value in (("min_image_tokens", low), ("max_image_tokens", high)):
            if value is not None and value < 1:
                raise ImageTokenBudgetError(f"{name} must be at least 1 (got {value}).")
        if low is not None and high is not None and low > high:
            raise ImageTokenBudgetError(
                f"min_image_tokens ({low}) is larger than max_image_tokens ({high}); lower the first or raise the second."
            )

    def apply(self, processor) -> ImageTokenBudget:
        """Set the budget on `processor`'s image processor; returns the settings now in force (all filled)."""
        image_processor = processor.image_processor
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                setattr(image_processor, field.name, value)
        in_force = ImageTokenBudget.of(processor)
        if in_force.min_image_tokens > in_force.max_image_tokens:
            raise ImageTokenBudgetError(
                f"With this budget min_image_tokens ({in_force.min_image_tokens}) exceeds max_image_tokens "
                f"({in_force.max_image_tokens}) of the model's processor; set both."
            )
        return in_force

    @classmethod
    def of(cls, processor) -> ImageTokenBudget:
        """The settings `processor` uses now."""
        image_processor = processor.image_processor
        return cls(**{field.name: getattr(image_processor, field.name) for field in fields(cls)})

    def to_json(self) -> dict:
        return asdict(self)


def processor_layout(image_processor, width: int, height: int) -> tuple:
    """What `image_processor` makes of a `width` x `height` picture, decided from its size alone:
    ((grid columns, grid rows) or None when it is not tiled, (width, height) of the single picture or
    thumbnail it resizes to, whether a thumbnail is added).

    Follows `Lfm2VlImageProcessor.resize_and_split` step by step with the processor's own helpers
    (tested against the processor's output), so sorting thousands of pictures by cost is free.
    """
    ip = image_processor
    patch, factor = ip.encoder_patch_size, ip.downsample_factor
    new_width, new_height = ip.smart_resize(
        height=height,
        width=width,
        downsample_factor=factor,
        min_image_tokens=ip.min_image_tokens,
        max_image_tokens=ip.max_image_tokens,
        encoder_patch_size=patch,
    )
    too_large = ip._is_image_too_large(
        height=height,
        width=width,
        max_image_tokens=ip.max_image_tokens,
        encoder_patch_size=patch,
        downsample_factor=factor,
        max_pixels_tolerance=ip.max_pixels_tolerance,
    )
    splitting = ip.do_image_splitting and not ip.min_tiles == ip.max_tiles == 1
    if not (too_large and splitting):
        return None, (new_width, new_height), False
    grid_width, grid_height, *_ = ip._get_grid_layout(
        height, width, min_tiles=ip.min_tiles, max_tiles=ip.max_tiles, tile_size=ip.tile_size
    )
    return (grid_width, grid_height), (new_width, new_height), bool(ip.use_thumbnail and grid_width * grid_height != 1)


def image_token_count(image_processor, width: int, height: int) -> int:
    """Image tokens `image_processor` makes of a `width` x `height` picture, without touching pixels."""
    ip = image_processor
    patch, factor = ip.encoder_patch_size, ip.downsample_factor

    def tokens(h: int, w: int) -> int:
        return math.ceil((h // patch) / factor) * math.ceil((w // patch) / factor)

    grid, (new_width, new_height), thumbnail = processor_layout(ip, width, height)
    if grid is None:
        return tokens(new_height, new_width)
    count = grid[0] * grid[1] * tokens(ip.tile_size, ip.tile_size)
    return count + (tokens(new_height, new_width) if thumbnail else 0)


# The reduced sizes a JPEG decoder can produce directly (libjpeg's DCT scaling, PIL's `Image.draft`).
DRAFT_SCALES = (8, 4, 2)


def draft_size(image_processor, width: int, height: int) -> tuple[int, int] | None:
    """The smallest size a JPEG of `width` x `height` can be decoded at (1/8, 1/4 or 1/2 of it) that
    `image_processor` treats exactly as the full picture, or None when no reduced decode is safe.

    Safe means: the processor decides the same layout from the reduced size (tiles, resized size,
    thumbnail; so the same image tokens), and every size it resizes to is still at most the reduced
    picture's, so it only downscales. The processor shrinks a 5,616 x 3,744 photo to a few tiles of
    512 px anyway; decoding it at half size skips three quarters of the decoding and of its resizing.
    """
    layout = processor_layout(image_processor, width, height)
    grid, resized, thumbnail = layout
    targets = [resized] if grid is None or thumbnail else []
    if grid is not None:
        targets.append((grid[0] * image_processor.tile_size, grid[1] * image_processor.tile_size))
    for scale in DRAFT_SCALES:
        reduced = (-(-width // scale), -(-height // scale))  # libjpeg rounds a scaled size up
        if all(w <= reduced[0] and h <= reduced[1] for w, h in targets) and (
            processor_layout(image_processor, *reduced) == layout
        ):
            return reduced
    return None


def budget_for_checkpoint(trained: dict | None, requested: ImageTokenBudget) -> tuple[ImageTokenBudget, str | None]:
    """The budget to evaluate a checkpoint with, and a warning when it differs from the training one.

    A checkpoint is scored with the budget it was trained with (`trained`, as recorded by training),
    except for settings the evaluation asks for explicitly (`requested`); those win, with a warning
    naming both values, since a model scored on other image sizes than it learned may do worse.
    """
    base = ImageTokenBudget(**(trained or {}))
    chosen = ImageTokenBudget(
        **{field.name: getattr(requested, field.name) if getattr(requested, field.name) is not None
           else getattr(base, field.name) for field in fields(ImageTokenBudget)}
    )  # fmt: skip
    differing = [
        f"{field.name} {getattr(base, field.name)} (training) vs {getattr(chosen, field.name)} (evaluation)"
        for field in fields(ImageTokenBudget)
        if getattr(base, field.name) is not None and getattr(base, field.name) != getattr(chosen, field.name)
    ]
    warning = (
        "Evaluating with another image-token budget than the checkpoints were trained with: " + "; ".join(differing)
        if differing
        else None
    )
    return chosen, warning
