"""The evaluator's earlier decoding, kept as an oracle: `model.generate` with every off-trie token masked.

It runs one forward pass per answer token and batches pictures in the order given. `decoding.py`
must give the same makers and scores with fewer passes; the tests compare the two, and
`bench/bench_evaluator.py` measures the speed-up ("before" vs "after").
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from car_maker_pipeline.evaluation.scoring.answers import AnswerTrie, Decoded


class TrieMask(LogitsProcessor):
    """Masks every token that does not continue some maker's answer; finished rows emit padding."""

    def __init__(self, trie: AnswerTrie, prompt_length: int, pad_id: int):
        self.trie, self.prompt_length, self.pad_id = trie, prompt_length, pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            mask[row, self.trie.children.get(tuple(ids)) or [self.pad_id]] = 0.0
        return scores + mask


@torch.inference_mode()
def generate_decode(model, inputs: dict, trie: AnswerTrie, pad_id: int, end_id: int) -> Decoded:
    """Greedy trie-constrained answers through `generate`, one forward pass per answer token."""
    length = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        max_new_tokens=trie.depth,
        do_sample=False,
        logits_processor=LogitsProcessorList([TrieMask(trie, length, pad_id)]),
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=pad_id,
        eos_token_id=end_id,  # finished rows are padded; the batch stops when every row has answered
    )
    generated = out.sequences[:, length:]
    logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.scores], dim=1)
    makers, scores = [], []
    for row, ids in enumerate(generated.tolist()):
        depth = next(d for d in range(1, len(ids) + 1) if tuple(ids[:d]) in trie.leaves)
        makers.append(trie.leaves[tuple(ids[:depth])])
        scores.append(float(logprobs[row, torch.arange(depth), generated[row, :depth]].sum().exp()))
    return Decoded(makers, scores, forward_passes=len(out.scores))
