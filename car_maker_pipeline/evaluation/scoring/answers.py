"""The makers' answers as token ids (`answer_token_ids`), and how they are scored.

Trie-constrained greedy decoding runs the model only where the answer still branches.

The answer is one of a few known token sequences (each maker's name, then end of turn), held in a
trie. Once the first token is chosen, most makers' remaining tokens are forced: the trie has a
single continuation, so the model's output there cannot change the answer and its probability,
renormalised over the allowed tokens, is exactly 1. `decode` therefore appends forced tokens
without a forward pass and runs the model again only when some row of the batch reaches a branch,
feeding it every token appended since the last pass in one chunk. With the demo's makers every
answer is decided by its first token, so a batch costs one forward pass (the prompt); the worst
case is the trie's branching depth.

This replaces `model.generate`, which runs one forward pass per answer token. The choice at every
branch is the same (argmax of the model's log-probabilities over the allowed tokens, ties to the
lowest token id, as `generate` with a masking logits processor does) and so is the score.

`score_answers` is what the classifier runs: instead of one greedy path it scores every maker's
whole answer (every token up to and including end of turn) for every image, normalised over the
makers, so each image gets a distribution to calibrate and abstain on. It costs one extra batched
pass over the answers' trie, which shares the prompt's cache (`answer_tree.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from car_maker_pipeline.evaluation.scoring.answer_tree import answer_log_likelihoods
from car_maker_pipeline.model_inputs.prompt import PromptTemplate

# Logits the answer pass may hold at once (rows x trie nodes x vocabulary; 2**28 floats is 1 GiB): the
# language-model head runs over the trie's nodes in chunks of this size, so memory stays bounded.
MAX_SCORING_LOGITS = 2**28


END_OF_TURN = "<|im_end|>"


class ClassifierError(ValueError):
    """The model, processor or maker list cannot be used for constrained classification."""


def answer_token_ids(processor, prompt: PromptTemplate, makers: Sequence[str]) -> tuple[str, dict[str, list[int]]]:
    """The prompt text (up to the answer) and, per maker, the answer's token ids up to end of turn.

    The answer ids are cut from the tokenization of the whole conversation, so they are the tokens
    the model sees in training, whatever the tokenizer does at the prompt/answer boundary.
    """
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ClassifierError(f"The tokenizer has no {END_OF_TURN!r} token; a ChatML chat template is required.")
    messages = prompt.messages(list(makers))
    prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answers: dict[str, list[int]] = {}
    for maker in makers:
        if not maker.strip():
            raise ClassifierError(f"Maker name {maker!r} is blank; every maker needs a name the model can say.")
        full_text = processor.apply_chat_template(messages + prompt.answer_messages(maker), tokenize=False)
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ClassifierError("The chat template renders the prompt differently with and without the answer.")
        rest = full_ids[len(prompt_ids) :]
        if end_id not in rest:
            raise ClassifierError(f"The chat template does not close the answer {maker!r} with {END_OF_TURN!r}.")
        ids = rest[: rest.index(end_id)]
        if not ids:
            raise ClassifierError(f"Maker name {maker!r} tokenizes to nothing; it cannot be scored.")
        answers[maker] = ids + [end_id]
    if len({tuple(ids) for ids in answers.values()}) != len(answers):
        raise ClassifierError("Two makers tokenize to the same answer; they could not be told apart.")
    return prompt_text, answers


class AnswerTrie:
    """The makers' answer token sequences as a trie: children of each prefix, and the maker at each leaf."""

    def __init__(self, answers: dict[str, list[int]]):
        self.children: dict[tuple[int, ...], list[int]] = {}
        self.leaves: dict[tuple[int, ...], str] = {}
        for maker, ids in answers.items():
            for depth in range(len(ids)):
                options = self.children.setdefault(tuple(ids[:depth]), [])
                if ids[depth] not in options:
                    options.append(ids[depth])
            self.leaves[tuple(ids)] = maker
        for options in self.children.values():
            options.sort()  # ascending ids: argmax ties resolve to the lowest id, as over the full vocabulary
        self.depth = max(len(ids) for ids in answers.values())

    def branching_depth(self) -> int:
        """The most branching prefixes on one answer's path: the worst-case forward passes per batch."""
        return max(
            sum(len(self.children.get(tuple(ids[:depth]), ())) > 1 for depth in range(len(ids))) for ids in self.leaves
        )


@dataclass(frozen=True)
class Decoded:
    makers: list[str]
    scores: list[float]  # probability of each answer, renormalised over the allowed tokens at each branch
    forward_passes: int


def _forward(model, cache, **inputs):
    out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), out.cache


@torch.inference_mode()
def decode(model, inputs: dict, trie: AnswerTrie, pad_id: int) -> Decoded:
    """Greedy trie-constrained answers for a left-padded batch (`inputs` from the processor)."""
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate: padding does not advance positions
    logprobs, cache = _forward(model, None, **inputs, position_ids=positions)
    passes = 1
    rows = mask.shape[0]
    prefixes: list[list[int]] = [[] for _ in range(rows)]
    scores = [0.0] * rows
    done = [False] * rows
    pending: list[list[int]] = []  # columns appended since the last forward pass
    last_position = positions[:, -1]
    while not all(done):
        branching = any(not done[r] and len(trie.children[tuple(prefixes[r])]) > 1 for r in range(rows))
        if branching and pending:
            chunk = torch.tensor(pending, device=mask.device).T  # (rows, tokens since last pass)
            mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
            steps = torch.arange(1, chunk.shape[1] + 1, device=mask.device)
            new_positions = last_position[:, None] + steps
            logprobs, cache = _forward(model, cache, input_ids=chunk, attention_mask=mask, position_ids=new_positions)
            last_position, pending, passes = new_positions[:, -1], [], passes + 1
        column = []
        for r in range(rows):
            if done[r]:
                column.append(pad_id)
                continue
            allowed = trie.children[tuple(prefixes[r])]
            token = allowed[0]
            if len(allowed) > 1:
                options = logprobs[r, allowed]
                best = int(torch.argmax(options))
                token = allowed[best]
                scores[r] += float(options[best] - torch.logsumexp(options, dim=0))
            prefixes[r].append(token)
            done[r] = tuple(prefixes[r]) in trie.leaves
            column.append(token)
        pending.append(column)
    makers = [trie.leaves[tuple(prefix)] for prefix in prefixes]
    return Decoded(makers, [float(torch.tensor(score).exp()) for score in scores], passes)


@dataclass(frozen=True)
class ScoredAnswers:
    makers: list[str]  # the most probable maker of each row
    scores: list[float]  # its probability, normalised over the makers
    log_probs: torch.Tensor  # (rows, makers): log-probability of every maker's answer, normalised over the makers
    forward_passes: int


@torch.inference_mode()
def score_answers(
    model,
    inputs: dict,
    makers: Sequence[str],
    answers: Sequence[Sequence[int]],
    max_logits: int = MAX_SCORING_LOGITS,
) -> ScoredAnswers:
    """Every maker's full-answer probability for a left-padded batch, normalised over the makers.

    `answers[m]` is maker m's answer token ids ending with end of turn. Two passes whatever the number
    of answers: one over the prompts, then one over the answers' trie that shares the prompts' cache
    (`answer_tree`), holding at most `max_logits` logits at once.
    """
    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    first, cache = _forward(model, None, **inputs, position_ids=positions)
    log_likelihood = answer_log_likelihoods(model, cache, mask, positions[:, -1], first, answers, max_logits).double()
    log_probs = log_likelihood - torch.logsumexp(log_likelihood, dim=1, keepdim=True)
    best = torch.argmax(log_probs, dim=1)  # ties to the first maker in list order
    return ScoredAnswers(
        makers=[makers[int(i)] for i in best],
        scores=[float(log_probs[r, i].exp()) for r, i in enumerate(best)],
        log_probs=log_probs.cpu(),
        forward_passes=2,
    )
