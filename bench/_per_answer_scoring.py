"""The answer scoring the pipeline used before `answer_tree.py`, kept here as the benches' baseline.

Each answer was scored in a row of its own: the prompt's cache repeated once per answer, the answers
sorted by length and split into passes that kept the repeated cache within a copy budget (16 MiB on a
CPU, 4 GiB on an accelerator) and the padding within what another pass costs (64 positions). It gives
the same log-probabilities as today's trie pass; the benches time the two in one process.
"""

from __future__ import annotations

import copy

import torch

from car_maker_pipeline.evaluation.scoring.answers import MAX_SCORING_LOGITS, ScoredAnswers, _forward

CPU_CACHE_BYTES, ACCELERATOR_CACHE_BYTES, PASS_COST_POSITIONS = 2**24, 2**32, 64


def _cache_bytes_per_row(cache, rows: int) -> int:
    tensors = [value for layer in getattr(cache, "layers", []) for value in vars(layer).values()]
    per_row = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows]
    return sum(t.nelement() * t.element_size() for t in per_row) // max(rows, 1)


def _chunks(widths: list[int], max_positions: int, max_answers: int) -> list[list[int]]:
    chunks, current, width = [], [], 0
    for index in sorted(range(len(widths)), key=lambda a: (widths[a], a)):
        wider = max(width, widths[index], 1)
        fits = (len(current) + 1) * wider <= max_positions and len(current) + 1 <= max_answers
        if current and (len(current) * (wider - width) > PASS_COST_POSITIONS or not fits):
            chunks.append(current)
            current, wider = [], max(widths[index], 1)
        current.append(index)
        width = wider
    return chunks + [current] if current else chunks


def _rows_log_likelihoods(model, cache, mask, last_position, first, answers, chunk) -> torch.Tensor:
    rows, picked, device = mask.shape[0], [answers[a] for a in chunk], mask.device
    width = max(len(ids) for ids in picked) - 1
    fed = torch.zeros((len(picked), width), dtype=torch.long)
    targets = torch.full((len(picked), width), -1, dtype=torch.long)
    for row, ids in enumerate(picked):
        fed[row, : len(ids) - 1], targets[row, : len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    total = first[:, torch.tensor([ids[0] for ids in picked], device=device)]
    repeats = len(picked)
    cache.reorder_cache(torch.arange(rows, device=device).repeat_interleave(repeats))
    ones = torch.ones((rows * repeats, width), device=device, dtype=mask.dtype)
    out = model(
        input_ids=fed.to(device).repeat(rows, 1),
        attention_mask=torch.cat([mask.repeat_interleave(repeats, 0), ones], 1),
        position_ids=last_position.repeat_interleave(repeats)[:, None] + torch.arange(1, width + 1, device=device),
        cache=cache,
        use_cache=True,
    )
    logits = out.logits.float()
    wanted = targets.to(device).repeat(rows, 1)
    picked_logits = logits.gather(-1, wanted.clamp(min=0)[..., None])[..., 0]
    return total + ((picked_logits - torch.logsumexp(logits, dim=-1)) * (wanted >= 0)).sum(-1).view(rows, repeats)


@torch.inference_mode()
def score_answers_in_rows(model, inputs: dict, makers, answers) -> ScoredAnswers:
    """`answers.score_answers` as it was: one row per answer, over copies of the prompt's cache."""
    mask = inputs["attention_mask"]
    budget = CPU_CACHE_BYTES if mask.device.type == "cpu" else ACCELERATOR_CACHE_BYTES
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    first, cache = _forward(model, None, **inputs, position_ids=positions)
    rows = mask.shape[0]
    chunks = _chunks(
        [len(ids) - 1 for ids in answers],
        MAX_SCORING_LOGITS // (rows * first.shape[-1]),
        budget // max(1, rows * _cache_bytes_per_row(cache, rows)),
    )
    parts = [
        _rows_log_likelihoods(
            model, cache if n == len(chunks) - 1 else copy.deepcopy(cache), mask, positions[:, -1], first, answers, c
        )
        for n, c in enumerate(chunks)
    ]
    order = torch.tensor([index for chunk in chunks for index in chunk], device=first.device)
    log_likelihood = torch.empty((rows, len(answers)), dtype=torch.float64, device=first.device)
    log_likelihood[:, order] = torch.cat(parts, dim=1).double()
    log_probs = log_likelihood - torch.logsumexp(log_likelihood, dim=1, keepdim=True)
    best = torch.argmax(log_probs, dim=1)
    return ScoredAnswers(
        makers=[makers[int(i)] for i in best],
        scores=[float(log_probs[r, i].exp()) for r, i in enumerate(best)],
        log_probs=log_probs.cpu(),
        forward_passes=1 + len(chunks),
    )
