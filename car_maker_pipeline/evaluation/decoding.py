"""Trie-constrained greedy decoding that runs the model only where the answer still branches.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
