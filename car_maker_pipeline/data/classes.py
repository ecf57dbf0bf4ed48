"""The 196 Stanford Cars class names, in the label-id order of `tanganke/stanford_cars`."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def stanford_cars_class_names() -> tuple[str, ...]:
    payload = json.loads(resources.files("car_maker_pipeline.data").joinpath("stanford_cars_classes.json").read_text())
    return tuple(payload["class_names"])
