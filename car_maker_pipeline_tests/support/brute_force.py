"""Scoring answers the slow, obvious way: the oracle for the evaluator's one-pass scoring."""

from __future__ import annotations

import torch


def answer_log_likelihoods_alone(model, processor, prompt_text: str, picture, answers: list[list[int]]) -> torch.Tensor:
    """log p(answer | prompt) of each answer for one picture, the oracle the scoring is tested against: prompt and
    answer in a row of their own through the model's own forward, no cache, every answer in one right-padded batch."""
    one = processor(images=[[picture]], text=[prompt_text], return_tensors="pt")
    prompt = one["input_ids"].shape[1]
    width = max(len(ids) for ids in answers)
    ids = torch.zeros((len(answers), prompt + width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, answer in enumerate(answers):
        ids[row, :prompt], ids[row, prompt : prompt + len(answer)] = one["input_ids"][0], torch.tensor(answer)
        mask[row, : prompt + len(answer)] = 1
    batch = {name: value.repeat(len(answers), *[1] * (value.dim() - 1)) for name, value in one.items()}
    batch |= {"input_ids": ids, "attention_mask": mask, "pixel_values": batch["pixel_values"].to(model.dtype)}
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(**batch).logits.double(), dim=-1)
    scores = [sum(float(log_probs[row, prompt - 1 + j, t]) for j, t in enumerate(a)) for row, a in enumerate(answers)]
    return torch.tensor(scores, dtype=torch.float64)
