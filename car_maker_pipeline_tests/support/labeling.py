"""Pictures and prediction rows for the labeling tests: small, distinct, unlike any drawn demo car."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from car_maker_pipeline.serving.batch import PREDICTION_COLUMNS


def picture(seed: int, fmt: str = "PNG") -> bytes:
    """A 32x24 noise picture: unlike any drawn demo car, unlike any other seed."""
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def prediction(name, maker, p, maker_2, p_2, answer=None, error=None) -> dict:
    """One maker_predictions row (PREDICTION_COLUMNS) for file `name`."""
    row = dict.fromkeys(PREDICTION_COLUMNS)
    row.update(file_name=name, maker=maker, probability=p, maker_2=maker_2, probability_2=p_2, error=error)
    row.update(answer=answer or maker, model_name="car-maker-tiny-s", model_version="1")
    return row
