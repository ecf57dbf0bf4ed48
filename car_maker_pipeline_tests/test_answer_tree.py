"""The answer trie's one pass: every answer's log-probability as if it had a row of its own.

| case                                                          | expected                                                   |
|---------------------------------------------------------------|------------------------------------------------------------|
| two answers sharing a first token, one of their own (kernel 3) | nodes by depth; ancestors; conv taps into the prompt state  |
| one answer of one token (kernel 2)                              | one node; its taps reach the prompt's last input            |
| a chain deeper than the kernel                                  | the deepest node's taps are its own ancestors only          |
| kernel 1; a split after two shared tokens (kernel 4); lengths differ | taps, ancestors and edges as worked out by hand       |
| the 196 real class names, class prompt, mixed picture sizes     | brute force's (a full pass per answer), 1e-5 relative       |
| LoRA adapters on every projection, nonzero weights              | equal to brute force through the adapted model              |
| attention and logits held a few nodes at a time                 | the same log-likelihoods as in one piece                    |
| a bfloat16 model                                                | brute force's in bfloat16, within its rounding              |
| a decoder that is not LFM2's                                    | UnsupportedDecoderError naming what is missing              |
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from car_maker_pipeline.data.classes import stanford_cars_class_names
from car_maker_pipeline.data.tasks import CLASS
from car_maker_pipeline.evaluation.scoring import answer_tree
from car_maker_pipeline.evaluation.scoring.answer_tree import AnswerTree, UnsupportedDecoderError, check_supported
from car_maker_pipeline.evaluation.scoring.answers import _forward, answer_token_ids
from car_maker_pipeline_tests.support.brute_force import answer_log_likelihoods_alone

END = 9
SHARED = ((5, 6, END), (5, 7, END), (8, END))


# | answers | kernel | tokens (nodes by depth) | ancestors (then the node again) | taps | answer edges |
@pytest.mark.parametrize(
    ("answers", "kernel", "tokens", "depths", "ancestors", "taps", "answer_edges"),
    [
        (SHARED, 3, [5, 8, 6, 7], [0, 0, 1, 1], [[0, 0], [1, 1], [2, 0], [3, 0]],
         [[1, 2, 3], [1, 2, 4], [2, 3, 5], [2, 3, 6]], [[0, 3], [1, 4], [2, 5]]),
        (((4, END),), 2, [4], [0], [[0]], [[1, 2]], [[0]]),
        (((1, 2, 3, 4, END),), 3, [1, 2, 3, 4], [0, 1, 2, 3],
         [[0, 0, 0, 0], [1, 0, 1, 1], [2, 1, 0, 2], [3, 2, 1, 0]],
         [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]], [[0, 1, 2, 3]]),
        (SHARED, 1, [5, 8, 6, 7], [0, 0, 1, 1], [[0, 0], [1, 1], [2, 0], [3, 0]],
         [[1], [2], [3], [4]], [[0, 3], [1, 4], [2, 5]]),
        (((3, 1, 2, END), (3, 1, 4, END)), 4, [3, 1, 2, 4], [0, 1, 2, 2],
         [[0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 1, 0]],
         [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 7]], [[0, 1, 3], [0, 2, 4]]),
        (((7, END), (6, 5, END)), 2, [7, 6, 5], [0, 0, 1], [[0, 0], [1, 1], [2, 1]],
         [[1, 2], [1, 3], [3, 4]], [[0, 3], [1, 2]]),
    ],
    ids=["shared-first-token", "one-token", "deeper-than-kernel", "no-conv-history", "two-shared-then-split",
         "lengths-differ"],
)  # fmt: skip
def test_the_tree_of_a_few_answers(answers, kernel, tokens, depths, ancestors, taps, answer_edges):
    tree = AnswerTree.build(answers, kernel)
    assert tree.tokens.tolist() == tokens and tree.depth.tolist() == depths
    assert tree.ancestors.tolist() == ancestors and tree.taps.tolist() == taps
    # An ancestor slot is attended (bias 0) for the node and each of its depth ancestors, none after.
    assert [[b == 0 for b in row] for row in tree.ancestor_bias.tolist()] == [
        [up <= depth for up in range(len(row))] for depth, row in zip(depths, ancestors)
    ]
    assert tree.answer_edges.tolist() == answer_edges
    assert tree.first.tolist() == [ids[0] for ids in answers]
    # Every answer's edges spell its tokens after the first, each read at the node of the prefix before it.
    for ids, edges in zip(answers, tree.answer_edges.tolist()):
        read = [(int(tree.edge_node[e]), int(tree.edge_token[e])) for e in edges if e < len(tree.edge_node)]
        assert [token for _, token in read] == list(ids[1:])
        assert [tokens[node] for node, _ in read] == list(ids[:-1])


def _assert_same_scores(scored: torch.Tensor, expected: torch.Tensor) -> None:
    """Log-likelihoods (float32, tens of nats) to 1e-5 relative; the distribution over answers to 1e-5."""
    torch.testing.assert_close(scored.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scored.double().softmax(-1), expected.softmax(-1), rtol=0, atol=1e-5)


def _tree_scores(model, processor, prompt_text: str, pictures: list, answers, max_logits: int = 2**28):
    inputs = dict(
        processor(images=[[p] for p in pictures], text=[prompt_text] * len(pictures), padding=True, return_tensors="pt")
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    first, cache = _forward(model, None, **inputs, position_ids=positions)
    return answer_tree.answer_log_likelihoods(model, cache, mask, positions[:, -1], first, answers, max_logits)


@pytest.fixture(scope="module")
def class_answers(tiny_model):
    classes = list(stanford_cars_class_names())
    prompt_text, answers = answer_token_ids(tiny_model.processor, CLASS.prompt(classes), classes)
    return prompt_text, [answers[name] for name in classes]


@pytest.fixture(scope="module")
def two_pictures(maker_dataset):
    test = maker_dataset.load()["test"]
    return [test[0]["image"].convert("RGB").resize((200, 90)), test[1]["image"].convert("RGB").resize((64, 48))]


def test_the_196_classes_score_as_brute_force_would(tiny_model, class_answers, two_pictures):
    prompt_text, answers = class_answers
    scored = _tree_scores(tiny_model.model, tiny_model.processor, prompt_text, two_pictures, answers)
    assert scored.shape == (2, 196)
    for row, picture in enumerate(two_pictures):  # the second picture is left-padded in the batch
        expected = answer_log_likelihoods_alone(tiny_model.model, tiny_model.processor, prompt_text, picture, answers)
        _assert_same_scores(scored[row], expected)


def test_lora_adapters_are_run_through(tiny_model_dir, class_answers, two_pictures):
    from peft import LoraConfig, get_peft_model

    from car_maker_pipeline.models.loading import load_model_and_processor

    loaded = load_model_and_processor(str(tiny_model_dir), device="cpu", dtype="float32")
    prompt_text, answers = class_answers
    answers = answers[::7]  # every 7th class: 28 answers, still sharing makers' tokens
    base = _tree_scores(loaded.model, loaded.processor, prompt_text, two_pictures[:1], answers)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    with model.disable_adapter():
        unadapted = _tree_scores(model, loaded.processor, prompt_text, two_pictures[:1], answers)
    adapted = _tree_scores(model, loaded.processor, prompt_text, two_pictures[:1], answers)
    expected = answer_log_likelihoods_alone(model, loaded.processor, prompt_text, two_pictures[0], answers)
    _assert_same_scores(adapted[0], expected)
    torch.testing.assert_close(unadapted, base)
    assert (adapted - unadapted).abs().max() > 1e-3  # the adapters change the answer, so they ran


def test_bounded_memory_gives_the_same_scores(tiny_model, class_answers, two_pictures, monkeypatch):
    prompt_text, answers = class_answers
    head_calls = []
    hook = tiny_model.model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    try:
        whole = _tree_scores(tiny_model.model, tiny_model.processor, prompt_text, two_pictures, answers)
        assert len(head_calls) == 1 + 1  # the prompt pass's last position, then every node at once
        monkeypatch.setattr(answer_tree, "MAX_ATTENTION_SCORES", 1)  # one node's scores at a time
        vocabulary = tiny_model.model.config.text_config.vocab_size
        head_calls.clear()
        pieces = _tree_scores(
            tiny_model.model, tiny_model.processor, prompt_text, two_pictures, answers, 3 * 2 * vocabulary
        )
    finally:
        hook.remove()
    nodes = len(AnswerTree.build(tuple(map(tuple, answers)), 3).tokens)
    assert len(head_calls) == 1 + math.ceil(nodes / 3)  # the logits of 3 nodes x 2 pictures at a time
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=0)


def test_a_bfloat16_model_scores_as_brute_force_does_in_bfloat16(tiny_model_dir, class_answers, two_pictures):
    from car_maker_pipeline.models.loading import load_model_and_processor

    loaded = load_model_and_processor(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    prompt_text, answers = class_answers
    answers = answers[::4]
    scored = _tree_scores(loaded.model, loaded.processor, prompt_text, two_pictures[:1], answers)
    assert scored.dtype == torch.float32 and torch.isfinite(scored).all()
    expected = answer_log_likelihoods_alone(loaded.model, loaded.processor, prompt_text, two_pictures[0], answers)
    difference = (scored[0].double().softmax(-1) - expected.softmax(-1)).abs().max()
    assert difference < 0.02, difference  # bfloat16 keeps 8 bits: sums of ~60 nats differ in their tenths


def test_a_decoder_that_is_not_lfm2_is_refused():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head = nn.Module(), nn.Linear(2, 2)
            self.decoder.layers = nn.ModuleList([nn.Module()])

        def get_decoder(self):
            return self.decoder

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(UnsupportedDecoderError, match=r"not an LFM2 language model.*embed_tokens.*LFM2-VL checkpoint"):
        check_supported(Other())
