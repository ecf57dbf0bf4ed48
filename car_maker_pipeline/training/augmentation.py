"""Light random changes to training pictures, made as they are read: a crop, a flip, colour.

Only the training dataloader reads through `AugmentedRows`; validation rows, the evaluator and the
stored dataset never see a changed picture (augmentation happens on the decoded copy, after the same
`model_ready` preparation the evaluator applies). Each change is drawn from a generator seeded by the
run's seed and the draw (`sampling.Draw`: epoch and place in the epoch), never from a global random
state, so a rerun with the same seed reads the same pictures, a resumed run continues as an
uninterrupted one would, and dropout and the data order are left exactly as they were.

The changes are mild on purpose: a crop keeping 80-100% of the area (aspect within 10%) resized back
to the picture's own size, so its image-token count and the batch it was grouped into stay valid; a
horizontal flip (cars face either way); brightness, contrast and saturation within 20%. Hue is not
jittered: body colour can tell makers apart (in the demo it is one of each maker's cues).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from car_maker_pipeline.training.sampling import Draw

CROP_AREA = (0.8, 1.0)  # share of the picture's area a crop keeps
CROP_ASPECT_CHANGE = 0.1  # the crop's aspect is the picture's times 1/(1+x) .. (1+x)
FLIP_PROBABILITY = 0.5
COLOUR_CHANGE = 0.2  # brightness, contrast and saturation factors drawn in 1-x .. 1+x
_STREAM = 0xA06  # keeps these generators apart from any other seeded from the same run seed


def augment_picture(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A randomly changed copy of `image`, of the same size and mode (the module docstring lists the changes)."""
    width, height = image.size
    area = width * height * rng.uniform(*CROP_AREA)
    aspect = width / height * math.exp(rng.uniform(-math.log1p(CROP_ASPECT_CHANGE), math.log1p(CROP_ASPECT_CHANGE)))
    crop_width = max(1, min(width, round(math.sqrt(area * aspect))))
    crop_height = max(1, min(height, round(math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    out = image.crop((left, top, left + crop_width, top + crop_height)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    if rng.random() < FLIP_PROBABILITY:
        out = ImageOps.mirror(out)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(1 - COLOUR_CHANGE, 1 + COLOUR_CHANGE))
    return out


def draw_rng(seed: int, draw: Draw) -> np.random.Generator:
    """The generator of one draw's changes: a function of the run's seed and the draw alone."""
    return np.random.default_rng([_STREAM, seed, draw.epoch, draw.position, draw.row])


class AugmentedRows(torch.utils.data.Dataset):
    """The training rows as the training dataloader reads them: by `Draw`, each picture changed by its draw.

    `rows` is the TRL dataset of `build_sft_dataset` (prompt, completion, image); only the `image` of
    the returned example is replaced, the dataset itself is never written to.
    """

    def __init__(self, rows, seed: int):
        self.rows, self.seed = rows, int(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, draw: Draw) -> dict:
        return self.__getitems__([draw])[0]

    def __getitems__(self, draws: Sequence[Draw]) -> list[dict]:
        if not all(isinstance(draw, Draw) for draw in draws):
            raise TypeError("AugmentedRows is read by Draw (a sampler built with keyed=True), not by row index.")
        examples = self.rows.__getitems__([draw.row for draw in draws])
        for example, draw in zip(examples, draws):
            example["image"] = augment_picture(example["image"], draw_rng(self.seed, draw))
        return examples
