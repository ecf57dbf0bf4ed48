"""Random-weight LFM2-VL at the real shapes (offline/real_shape.py), checked without building the weights.

| shape | parameters (published size)  | vision tower |
|-------|------------------------------|--------------|
| 450m  | 448.7M (LFM2-VL-450M)        | 85.8M        |
| 1.6b  | 1.60B (LFM2-VL-1.6B)         | 412.6M       |
| 3b    | 3.00B (LFM2-VL-3B)           | 412.6M       |

Image tokens per picture with LFM2-VL's own image processor: 300x200 -> 70, 640x480 -> 234,
2000x500 -> 1,280 (1x4 tiles), 1600x1200 -> 1,770 (2x3 + thumbnail), 4000x500 -> 2,273 (1x8).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Lfm2VlImageProcessor, Lfm2VlProcessor

from car_maker_pipeline.offline.real_shape import real_shape_config
from car_maker_pipeline.offline.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize(
    ("shape", "parameters_m", "vision_m"), [("450m", 448.7, 85.8), ("1.6b", 1596.6, 412.6), ("3b", 2999.0, 412.6)]
)
def test_parameter_counts_match_the_published_models(tokenizer, shape, parameters_m, vision_m):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = AutoModelForImageTextToText.from_config(real_shape_config(shape, tokenizer))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    vision = sum(p.numel() for name, p in model.named_parameters() if "vision_tower" in name) / 1e6
    assert total == pytest.approx(parameters_m, abs=0.5) and vision == pytest.approx(vision_m, abs=0.5)


@pytest.mark.parametrize(
    ("size", "tokens"),
    [((300, 200), 70), ((640, 480), 234), ((2000, 500), 1280), ((1600, 1200), 1770), ((4000, 500), 2273)],
)
def test_image_tokens_match_the_real_processor_settings(tokenizer, size, tokens):
    processor = Lfm2VlProcessor(
        image_processor=Lfm2VlImageProcessor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    encoded = processor(images=[[Image.new("RGB", size)]], text=[IMAGE_TOKEN], return_tensors="pt")
    assert int((encoded["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum()) == tokens


def test_unknown_shape_is_refused(tokenizer):
    with pytest.raises(ValueError, match="450m"):
        real_shape_config("7b", tokenizer)
