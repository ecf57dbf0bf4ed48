"""Classify car images into makers with a vision-language model, always answering a valid maker.

The model is never free to ramble: decoding is constrained to a trie of the makers' answer tokens
(each followed by the end-of-turn token), so every image gets exactly one maker and nothing is
dropped for failing to parse. Images are processed in left-padded batches, and a maker answer
takes only as many decoding steps as its longest tokenization.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from car_maker_pipeline.model_inputs.images import model_ready
from car_maker_pipeline.model_inputs.prompt import PromptTemplate

END_OF_TURN = "<|im_end|>"


class ClassifierError(ValueError):
    """The model, processor or maker list cannot be used for constrained classification."""


@dataclass(frozen=True)
class Prediction:
    maker: str
    score: float  # probability of the chosen answer, renormalised over the allowed tokens at each step


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


class _Trie:
    def __init__(self, answers: dict[str, list[int]]):
        self.children: dict[tuple[int, ...], set[int]] = {}
        self.leaves: dict[tuple[int, ...], str] = {}
        for maker, ids in answers.items():
            for depth in range(len(ids)):
                self.children.setdefault(tuple(ids[:depth]), set()).add(ids[depth])
            self.leaves[tuple(ids)] = maker
        self.depth = max(len(ids) for ids in answers.values())


class _TrieConstraint(LogitsProcessor):
    """Masks every token that does not continue some maker's answer; finished rows emit padding."""

    def __init__(self, trie: _Trie, prompt_length: int, pad_id: int):
        self.trie, self.prompt_length, self.pad_id = trie, prompt_length, pad_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            allowed = self.trie.children.get(tuple(ids))
            mask[row, list(allowed) if allowed else [self.pad_id]] = 0.0
        return scores + mask


class MakerClassifier:
    """Constrained, batched maker classification with one model and one prompt."""

    def __init__(
        self, model, processor, makers: Sequence[str], prompt: PromptTemplate | None = None, batch_size: int = 16
    ):
        if not makers:
            raise ClassifierError("The maker list is empty; there is nothing to classify into.")
        self.model, self.processor, self.makers = model, processor, list(makers)
        self.prompt = prompt or PromptTemplate()
        self.batch_size = batch_size
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", "<image>")
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if (
            image_id is None
            or image_id == tokenizer.unk_token_id
            or image_id != getattr(model.config, "image_token_id", image_id)
        ):
            raise ClassifierError(
                f"The tokenizer has no image token {image_token!r} matching the model's image_token_id "
                f"({getattr(model.config, 'image_token_id', None)}); the processor does not belong to this model."
            )
        self.prompt_text, self.answers = answer_token_ids(processor, self.prompt, self.makers)
        self.trie = _Trie(self.answers)
        self.end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.convert_tokens_to_ids(END_OF_TURN)
        )
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        self.device = next(model.parameters()).device

    @property
    def prompt_hash(self) -> str:
        return self.prompt.fingerprint(self.makers)

    @torch.inference_mode()
    def classify_batch(self, images: Sequence) -> list[Prediction]:
        images = [model_ready(image) for image in images]
        inputs = self.processor(
            images=[[image] for image in images],
            text=[self.prompt_text] * len(images),
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.trie.depth,
            do_sample=False,
            logits_processor=LogitsProcessorList([_TrieConstraint(self.trie, prompt_length, self.pad_id)]),
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            eos_token_id=self.end_id,  # finished rows are padded; the batch stops when every row has answered
        )
        generated = out.sequences[:, prompt_length:]
        step_logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.scores], dim=1)
        predictions = []
        for row, ids in enumerate(generated.tolist()):
            answer = self._leaf(ids)
            length = len(self.answers[answer])
            chosen = step_logprobs[row, torch.arange(length), generated[row, :length]]
            predictions.append(Prediction(answer, float(chosen.sum().exp())))
        return predictions

    def _leaf(self, ids: list[int]) -> str:
        for depth in range(1, len(ids) + 1):
            maker = self.trie.leaves.get(tuple(ids[:depth]))
            if maker is not None:
                return maker
        raise ClassifierError(f"Constrained decoding produced no complete maker answer: {ids}")  # cannot happen

    def classify(self, images: Iterable) -> list[Prediction]:
        images = list(images)
        predictions: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            predictions.extend(self.classify_batch(images[start : start + self.batch_size]))
        return predictions


@dataclass
class EvaluationRun:
    predictions: pd.DataFrame  # index, true_maker, predicted_maker, score
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else float("nan")


def evaluate_split(classifier: MakerClassifier, split, max_images: int | None = None) -> EvaluationRun:
    """Classify every image of a maker-dataset split (or the first `max_images`)."""
    if split.num_rows == 0:
        raise ClassifierError(
            "The split to evaluate is empty; materialize car_maker_dataset with a non-empty test split."
        )
    if max_images is not None:
        split = split.select(range(min(max_images, split.num_rows)))
    # One untimed batch first: the first forward pass pays one-off kernel and allocator set-up,
    # which would otherwise dominate images/s on a small split.
    classifier.classify_batch(split.select(range(min(classifier.batch_size, split.num_rows)))["image"])
    started = time.perf_counter()
    rows = []
    for start in range(0, split.num_rows, classifier.batch_size):
        batch = split[start : start + classifier.batch_size]
        for offset, (maker, prediction) in enumerate(zip(batch["maker"], classifier.classify_batch(batch["image"]))):
            rows.append(
                {
                    "index": start + offset,
                    "true_maker": maker,
                    "predicted_maker": prediction.maker,
                    "score": prediction.score,
                }
            )
    return EvaluationRun(pd.DataFrame(rows), time.perf_counter() - started)
