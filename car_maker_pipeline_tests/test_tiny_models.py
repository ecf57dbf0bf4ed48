"""The tiny random-weight LFM2-VL models load and run exactly like a real LFM2-VL checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.offline.tiny_models import MARKER_FILE, TINY_MODEL_SPECS, build_tiny_model
from car_maker_pipeline.offline.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, build_tokenizer

MAKERS = ["AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce"]


@pytest.fixture(scope="module")
def built_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build_tiny_model(root / name, name, seed=0) for name in TINY_MODEL_SPECS}


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _picture(colour, size=(128, 96)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (20, 30, 90, 70))
    return image


def test_directory_looks_like_a_real_lfm2_vl_checkpoint(built_models):
    path = built_models["tiny-s"]
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        MARKER_FILE,
    ):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lfm2_vl"
    assert config["vision_config"]["model_type"] == "siglip2_vision_model"
    assert config["text_config"]["model_type"] == "lfm2"
    assert set(config["text_config"]["layer_types"]) == {"conv", "full_attention"}
    assert config["text_config"]["initializer_range"] == pytest.approx(0.2)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert config["image_token_id"] == vocab[IMAGE_TOKEN]
    processor_config = json.loads((path / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Lfm2VlProcessor"
    assert processor_config["image_processor"]["encoder_patch_size"] == config["vision_config"]["patch_size"]


@pytest.mark.parametrize("name", list(TINY_MODEL_SPECS))
def test_loads_with_auto_classes_and_runs_the_evaluation_prompt(built_models, name):
    model, processor = _load(built_models[name])
    assert type(model).__name__ == "Lfm2VlForConditionalGeneration"
    assert type(processor).__name__ == "Lfm2VlProcessor"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text = processor.apply_chat_template(PromptTemplate().messages(MAKERS), add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|startoftext|><|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert text.count(IMAGE_TOKEN) == 1

    inputs = processor(images=[[_picture((200, 30, 30))]], text=[text], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == 48  # a 128x96 picture at native resolution: 6x8 blocks of 2x2 8-pixel patches
    big = processor(images=[[_picture((10, 200, 10), size=(640, 480))]], text=[text], return_tensors="pt")
    assert int((big["input_ids"] == model.config.image_token_id).sum()) <= 48  # larger pictures are downscaled
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(logits).all()


def test_chat_template_renders_every_role_and_content_shape(built_models):
    _, processor = _load(built_models["tiny-s"])
    messages = PromptTemplate().messages(MAKERS) + PromptTemplate.answer_messages("BMW")
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nBMW<|im_end|>\n")
    assert "<|im_start|>user\n<image>What is the car maker" in text
    plain = processor.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert plain == "<|startoftext|><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_are_single_tokens_and_makers_tokenize_compactly():
    tokenizer = build_tokenizer()
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert 1000 <= len(tokenizer) <= 2100
    for maker in MAKERS:
        assert len(tokenizer(maker, add_special_tokens=False)["input_ids"]) <= 3
        assert tokenizer.decode(tokenizer(maker, add_special_tokens=False)["input_ids"]) == maker


def test_batched_left_padded_generation_matches_single_prompts(built_models):
    model, processor = _load(built_models["tiny-s"])
    template = PromptTemplate()
    texts = [
        processor.apply_chat_template(template.messages(MAKERS[:2]), add_generation_prompt=True, tokenize=False),
        processor.apply_chat_template(template.messages(MAKERS), add_generation_prompt=True, tokenize=False),
    ]
    images = [_picture((200, 30, 30)), _picture((30, 30, 200), size=(96, 128))]
    batch = processor(images=[[i] for i in images], text=texts, return_tensors="pt", padding=True, padding_side="left")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] and batch["attention_mask"][0, 0] == 0  # really left padded

    with torch.no_grad():
        batched_logits = model(**batch).logits[:, -1]
        batched = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for row, (text, image) in enumerate(zip(texts, images)):
            single = processor(images=[[image]], text=[text], return_tensors="pt")
            single_logits = model(**single).logits[0, -1]
            torch.testing.assert_close(batched_logits[row], single_logits, atol=1e-4, rtol=1e-4)
            alone = model.generate(**single, max_new_tokens=5, do_sample=False)[0, single["input_ids"].shape[1] :]
            assert batched[row].tolist() == alone.tolist()


def test_same_seed_same_weights_and_rebuild_is_a_no_op(tmp_path, built_models):
    again = build_tiny_model(tmp_path / "again", "tiny-s", seed=0)
    assert _sha256(again / "model.safetensors") == _sha256(built_models["tiny-s"] / "model.safetensors")
    assert _sha256(again / "tokenizer.json") == _sha256(built_models["tiny-s"] / "tokenizer.json")
    other = build_tiny_model(tmp_path / "other", "tiny-s", seed=1)
    assert _sha256(other / "model.safetensors") != _sha256(again / "model.safetensors")

    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again, "tiny-s", seed=0) == again  # complete: returned, not rebuilt
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="seed"):
        build_tiny_model(again, "tiny-s", seed=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_refuses_foreign_folders_and_unknown_names(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(foreign, "tiny-s")
    with pytest.raises(ValueError, match="tiny-xl"):
        build_tiny_model(tmp_path / "x", "tiny-xl")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model(empty, "tiny-s") / MARKER_FILE).is_file()


def test_sizes_increase_and_lfm2_linear_layers_exist(built_models):
    counts = {}
    for name, path in built_models.items():
        model, _ = _load(path)
        counts[name] = sum(p.numel() for p in model.parameters())
        linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        language = {n for n in linear if ".language_model." in n}
        vision = {n for n in linear if ".vision_tower." in n}
        projector = {n for n in linear if ".multi_modal_projector." in n}
        for suffix in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "conv.in_proj",
            "conv.out_proj",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        ):
            assert any(n.endswith(suffix) for n in language), (name, suffix)
        for suffix in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            assert any(n.endswith(suffix) for n in vision), (name, suffix)
        assert {n.rsplit(".", 1)[-1] for n in projector} == {"linear_1", "linear_2"}
    assert counts["tiny-s"] < counts["tiny-m"] < counts["tiny-l"]
    # Small enough that forward+backward on 8 images takes ~0.05-0.15 s on 2 idle cores (not asserted:
    # wall-clock checks are flaky on shared machines).
    assert counts["tiny-l"] < 2_000_000
