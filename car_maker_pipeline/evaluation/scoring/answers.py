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
pass: the prompt's cache is repeated once per maker and all answers are fed at once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from car_maker_pipeline.model_inputs.prompt import PromptTemplate

# Logits one answer-scoring pass may hold (rows x answer tokens x vocabulary; 2**28 floats is 1 GiB):
# 49 makers x 16 images x 5 tokens x LFM2's 65,536-token vocabulary still fit in one pass; more are
# split into several batched passes over groups of makers, so memory stays bounded.
MAX_SCORING_LOGITS = 2**28
# Bytes of prompt cache one answer-scoring pass may hold: the cache is repeated once per maker of the
# pass, and at LFM2-VL-450M's shape a 2,000-token photo's cache is about 28 MB per row in bf16, so
# 49 makers x 16 photos would repeat it into 22 GB. 4 GiB keeps a pass on any GPU the models fit on.
MAX_SCORING_CACHE_BYTES = 2**32
# On a CPU the copies are the cost: passes whose copies stay near the processor's caches run several times
# faster per answer than one that streams hundreds of megabytes. Measured on tiny-s, 32 pictures in batches
# of 16 (bench/bench_class_scoring.py): the 49 real makers 0.9 s in one pass, 0.35 s at this budget (10
# passes); the 196 classes 6.8 s in one pass, 2.0 s at this budget, 3.2 s at 32 MiB, 2.4 s at 8 MiB.
CPU_SCORING_CACHE_BYTES = 2**24
# What one more answer-scoring pass is taken to cost, in padded answer positions per image (a forward call
# through every layer). It matters where one pass could hold every answer (an accelerator's budgets): the
# class task's names run from 3 to 17 tokens, and one pass would compute 2.2 times the answer tokens. On a
# CPU the passes are small and sorted by length anyway. Not measured on a GPU yet.
PASS_COST_POSITIONS = 64


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


def _answer_log_likelihoods(model, cache, mask, last_position, first, answers, chunk_makers) -> torch.Tensor:
    """log p(answer | prompt) for `chunk_makers` (indices into `answers`), shape (rows, len(chunk_makers))."""
    rows = mask.shape[0]
    picked = [answers[m] for m in chunk_makers]
    width = max(len(ids) for ids in picked) - 1  # fed: every token but end of turn, whose probability is read
    fed = torch.zeros((len(picked), width), dtype=torch.long)
    targets = torch.full((len(picked), width), -1, dtype=torch.long)
    for row, ids in enumerate(picked):
        fed[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(ids) - 1] = torch.tensor(ids[1:])
    device = mask.device
    first_ids = torch.tensor([ids[0] for ids in picked], device=device)
    total = first[:, first_ids]  # (rows, makers): the first answer token, from the prompt pass
    repeats = len(picked)
    cache.reorder_cache(torch.arange(rows, device=device).repeat_interleave(repeats))
    steps = torch.arange(1, width + 1, device=device)
    out = model(
        input_ids=fed.to(device).repeat(rows, 1),
        attention_mask=torch.cat(
            [mask.repeat_interleave(repeats, 0), torch.ones((rows * repeats, width), device=device, dtype=mask.dtype)],
            1,
        ),
        position_ids=last_position.repeat_interleave(repeats)[:, None] + steps,
        cache=cache,
        use_cache=True,
    )
    logits = out.logits.float()  # (rows * makers, width, vocabulary); log p = logit - logsumexp, no second copy
    wanted = targets.to(device).repeat(rows, 1)
    picked_logits = logits.gather(-1, wanted.clamp(min=0)[..., None])[..., 0]
    gathered = (picked_logits - torch.logsumexp(logits, dim=-1)) * (wanted >= 0)
    return total + gathered.sum(-1).view(rows, repeats)


def cache_bytes_per_row(cache, rows: int) -> int:
    """What one row of the prompt's cache occupies: every tensor its layers hold per row, as
    attributes whose first dimension is the batch (the attention layers' keys and values, which grow
    with the prompt). Counters the layers keep for the whole batch (a length as a 0-d tensor) are no
    row's; LFM2's conv layers keep a few tokens of state in lists, not among them and negligible next
    to a 2,000-token photo's keys and values."""
    tensors = [value for layer in getattr(cache, "layers", []) for value in vars(layer).values()]
    per_row = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows]
    return sum(t.nelement() * t.element_size() for t in per_row) // max(rows, 1)


def answer_chunks(widths: Sequence[int], max_positions: int, max_answers: int) -> list[list[int]]:
    """The answers (indices) of each scoring pass, shortest first. `widths[a]`: the tokens fed for answer a.

    A pass feeds its answers padded to its longest, so answers of very different lengths (the class task's
    names run from 3 to 17 tokens) would spend most of a pass on padding: a pass is closed where widening it
    to the next answer would pad more positions than `PASS_COST_POSITIONS`, what another pass costs. A pass
    also holds at most `max_positions` answer positions per row (its logits) and `max_answers` answers (its
    copies of the prompt's cache); one answer alone always makes a pass.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in sorted(range(len(widths)), key=lambda a: (widths[a], a)):
        wider = max(width, widths[index], 1)
        widening = len(current) * (wider - width)
        fits = (len(current) + 1) * wider <= max_positions and len(current) + 1 <= max_answers
        if current and (widening > PASS_COST_POSITIONS or not fits):
            chunks.append(current)
            current, wider = [], max(widths[index], 1)
        current.append(index)
        width = wider
    return chunks + [current] if current else chunks


@torch.inference_mode()
def score_answers(
    model,
    inputs: dict,
    makers: Sequence[str],
    answers: Sequence[Sequence[int]],
    max_logits: int = MAX_SCORING_LOGITS,
    max_cache_bytes: int | None = None,
) -> ScoredAnswers:
    """Every maker's full-answer probability for a left-padded batch, normalised over the makers.

    `answers[m]` is maker m's answer token ids ending with end of turn. One pass over the prompt,
    then the answers of as many makers as fit in `max_logits` logits and `max_cache_bytes` of
    repeated cache per pass, from a copy of the prompt's cache repeated once per maker (no
    per-maker pass over the images). `max_cache_bytes` None: MAX_SCORING_CACHE_BYTES on an accelerator,
    CPU_SCORING_CACHE_BYTES on the CPU.
    """
    mask = inputs["attention_mask"]
    if max_cache_bytes is None:
        max_cache_bytes = CPU_SCORING_CACHE_BYTES if mask.device.type == "cpu" else MAX_SCORING_CACHE_BYTES
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    first, cache = _forward(model, None, **inputs, position_ids=positions)
    rows = mask.shape[0]
    chunks = answer_chunks(
        [len(ids) - 1 for ids in answers],
        max_logits // (rows * first.shape[-1]),
        max_cache_bytes // max(1, rows * cache_bytes_per_row(cache, rows)),
    )
    parts = []
    for number, chunk in enumerate(chunks):
        # The last chunk may consume the prompt's cache; every earlier one works on a copy.
        chunk_cache = cache if number == len(chunks) - 1 else copy.deepcopy(cache)
        parts.append(_answer_log_likelihoods(model, chunk_cache, mask, positions[:, -1], first, answers, chunk))
    order = torch.tensor([index for chunk in chunks for index in chunk])
    log_likelihood = torch.empty((rows, len(answers)), dtype=torch.float64, device=first.device)
    log_likelihood[:, order.to(first.device)] = torch.cat(parts, dim=1).double()
    log_probs = log_likelihood - torch.logsumexp(log_likelihood, dim=1, keepdim=True)
    best = torch.argmax(log_probs, dim=1)  # ties to the first maker in list order
    return ScoredAnswers(
        makers=[makers[int(i)] for i in best],
        scores=[float(log_probs[r, i].exp()) for r, i in enumerate(best)],
        log_probs=log_probs.cpu(),
        forward_passes=1 + len(chunks),
    )
