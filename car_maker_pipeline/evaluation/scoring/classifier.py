"""Classify car images into makers with a vision-language model, always answering a valid maker.

The model is never free to ramble: it only scores the makers' answers (each maker's tokens followed
by the end-of-turn token), so every image gets exactly one maker and nothing is dropped for failing
to parse. Every maker's whole answer is scored, so each image gets a probability for every maker
(normalised over the makers) and the prediction is the most probable one. Images are processed in
left-padded batches: one pass over the prompts, one batched pass over all the answers.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import pandas as pd
import torch
from PIL import Image

from car_maker_pipeline.evaluation.scoring.answers import AnswerTrie, score_answers
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget, image_token_count
from car_maker_pipeline.model_inputs.images import MAX_BATCH_PIXELS, model_ready, padded_size
from car_maker_pipeline.model_inputs.prompt import PromptTemplate

END_OF_TURN = "<|im_end|>"


class ClassifierError(ValueError):
    """The model, processor or maker list cannot be used for constrained classification."""


@dataclass(frozen=True)
class Prediction:
    maker: str
    score: float  # probability of the chosen maker, normalised over the makers
    # log-probability of every maker (the classifier's order), normalised over the makers; None from
    # a greedy decoder, which scores only the path it takes
    log_probs: tuple[float, ...] | None = None


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


@dataclass
class ThroughputStats:
    """What the evaluator computed, to see waste: prompt tokens real vs. padded, passes, image tokens."""

    images: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    image_passes: int = 0  # per image, the forward passes its batch ran, summed
    image_tokens: list[int] = field(default_factory=list)

    def add_batch(self, real_tokens: int, padded_tokens: int, forward_passes: int, image_tokens: list[int]) -> None:
        self.images += len(image_tokens)
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.image_passes += forward_passes * len(image_tokens)
        self.image_tokens.extend(image_tokens)

    def summary(self) -> dict[str, float]:
        tokens = np.asarray(self.image_tokens or [0])
        return {
            "image_tokens_mean": float(tokens.mean()),
            "image_tokens_p95": float(np.percentile(tokens, 95)),
            "prompt_tokens_real": float(self.real_tokens),
            "prompt_tokens_computed": float(self.padded_tokens),
            "padded_to_real_tokens": self.padded_tokens / self.real_tokens if self.real_tokens else float("nan"),
            "forward_passes_per_image": self.image_passes / self.images if self.images else float("nan"),
        }


class MakerClassifier:
    """Constrained, batched maker classification with one model and one prompt."""

    def __init__(
        self,
        model,
        processor,
        makers: Sequence[str],
        prompt: PromptTemplate | None = None,
        batch_size: int = 16,
        budget: ImageTokenBudget | None = None,
        sort_window: int = 64,
        decoder=None,
        max_batch_pixels: int = MAX_BATCH_PIXELS,
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
        self.trie = AnswerTrie(self.answers)
        # The budget in force (the processor's own settings where the budget leaves them unset).
        self.budget = (budget or ImageTokenBudget()).apply(processor)
        self.sort_window = max(1, sort_window)
        self.max_batch_pixels = max_batch_pixels
        # None: every maker's answer is scored; a greedy `decoder(model, inputs, trie, pad_id)` (such as
        # `decoding.decode`) follows one path instead and gives no distribution (the benchmark compares them).
        self.decoder = decoder
        self.stats = ThroughputStats()
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

    def image_tokens(self, picture) -> int:
        """Image tokens this classifier's processor makes of a model-ready picture, or of a (width, height)."""
        size = picture if isinstance(picture, tuple) else picture.size
        return image_token_count(self.processor.image_processor, *size)

    def classify_batch(self, images: Sequence) -> list[Prediction]:
        """One batch, in the order given (no sorting): `classify` is the one to call for many images."""
        return self._run_batch([model_ready(image) for image in images])

    @torch.inference_mode()
    def _run_batch(self, images: Sequence, decoder=None) -> list[Prediction]:
        """One batch of model-ready pictures, every maker scored; a `decoder(model, inputs, trie, pad_id)`
        replaces that with a greedy path (the benchmark times greedy trie decoding and `generate` so)."""
        inputs = self.processor(
            images=[[image] for image in images],
            text=[self.prompt_text] * len(images),
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        decoder = decoder or self.decoder
        if decoder is None:
            decoded = score_answers(self.model, dict(inputs), self.makers, [self.answers[m] for m in self.makers])
        else:
            decoded = decoder(self.model, dict(inputs), self.trie, self.pad_id)
        mask = inputs["attention_mask"]
        self.stats.add_batch(
            real_tokens=int(mask.sum()),
            padded_tokens=int(mask.numel()),
            forward_passes=decoded.forward_passes,
            image_tokens=[self.image_tokens(image) for image in images],
        )
        log_probs = getattr(decoded, "log_probs", None)
        return [
            Prediction(maker, score, None if log_probs is None else tuple(log_probs[row].tolist()))
            for row, (maker, score) in enumerate(zip(decoded.makers, decoded.scores))
        ]

    def classify(self, images: Iterable) -> list[Prediction]:
        """Predictions in input order; batches are formed from pictures of similar token cost.

        A left-padded batch computes every row at the length of its longest, so pictures are sorted
        by image tokens within windows of `sort_window` batches and the answers put back in order.
        The cost comes from each picture's size alone, and a picture is prepared (decoded, RGB,
        padded) only when its batch runs, so `StoredPicture`s (header read, pixels not) cost no
        pixel memory while they wait in a window, nor after their batch. A batch also ends before its decoded
        pictures pass `max_batch_pixels`, so a run of large photos goes through in smaller batches.
        """
        images = list(images)
        predictions: list[Prediction | None] = [None] * len(images)
        window = self.batch_size * self.sort_window
        for start in range(0, len(images), window):
            sizes = {i: _ready_size(images[i]) for i in range(start, min(start + window, len(images)))}
            ordered = sorted(sizes, key=lambda i: (self.image_tokens(sizes[i]), i))
            for chunk in pixel_bounded_batches(ordered, sizes, self.batch_size, self.max_batch_pixels):
                batch = [model_ready(_opened(images[i])) for i in chunk]
                for index, prediction in zip(chunk, self._run_batch(batch)):
                    predictions[index] = prediction
                del batch  # its pixels go now, not once the next batch is decoded beside them
        return predictions


def pixel_bounded_batches(
    ordered: Sequence[int], sizes: dict[int, tuple[int, int]], batch_size: int, max_pixels: int
) -> list[list[int]]:
    """`ordered` cut into consecutive batches of at most `batch_size` pictures and `max_pixels`
    decoded pixels (`sizes[i]`: picture i's width and height); a picture alone may exceed it."""
    batches: list[list[int]] = []
    batch, pixels = [], 0
    for index in ordered:
        area = sizes[index][0] * sizes[index][1]
        if batch and (len(batch) == batch_size or pixels + area > max_pixels):
            batches.append(batch)
            batch, pixels = [], 0
        batch.append(index)
        pixels += area
    if batch:
        batches.append(batch)
    return batches


def _ready_size(image) -> tuple[int, int]:
    """The size `model_ready` will give `image`, from its header (stored pictures are within the limits)."""
    return padded_size(*image.size)


@dataclass(frozen=True)
class StoredPicture:
    """An image file as stored (bytes or a path): its size read from the header, its pixels decoded
    only when its batch runs and dropped with the batch.

    Why not a lazily opened `PIL.Image`: once its batch decodes it, the image object keeps the
    pixels for as long as it lives, so a sorting window of 2,048 realistic photos held them all
    (6.7 GB for 1,005 test pictures, measured) although each batch needed only its own.
    """

    data: bytes | None
    path: str | None
    size: tuple[int, int]

    @classmethod
    def of(cls, cell: dict) -> StoredPicture:
        data, path = cell.get("bytes") or None, cell.get("path")
        with Image.open(io.BytesIO(data) if data else path) as header:
            return cls(data, None if data else path, header.size)

    def open(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data) if self.data else self.path)


def _opened(image):
    """A decoded picture as is; a stored one (`StoredPicture`, or any other with `size` and `open()`) opened now."""
    return image if isinstance(image, Image.Image) else image.open()


@dataclass
class EvaluationRun:
    # index, true_maker, predicted_maker, score, log_probs (every maker's, in the classifier's order)
    predictions: pd.DataFrame
    seconds: float
    throughput: dict[str, float] = field(default_factory=dict)  # ThroughputStats.summary() of the timed pass

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else float("nan")


def evaluate_split(classifier: MakerClassifier, split, max_images: int | None = None) -> EvaluationRun:
    """Classify every image of a maker-dataset split (or the first `max_images`).

    Rows are read one sorting window at a time as undecoded bytes (`classify` sorts them by cost and
    decodes a batch at a time, `StoredPicture`), so memory holds one window's compressed files and
    one batch's pixels (at most `max_batch_pixels`), whatever the split's size.
    """
    if split.num_rows == 0:
        raise ClassifierError(
            "The split to evaluate is empty; materialize car_maker_dataset with a non-empty test split."
        )
    if max_images is not None:
        split = split.select(range(min(max_images, split.num_rows)))
    # One untimed batch first: the first forward pass pays one-off kernel and allocator set-up,
    # which would otherwise dominate images/s on a small split.
    classifier.classify_batch(split.select(range(min(classifier.batch_size, split.num_rows)))["image"])
    classifier.stats = ThroughputStats()
    started = time.perf_counter()
    rows = []
    window = classifier.batch_size * classifier.sort_window
    stored = split.cast_column("image", datasets.Image(decode=False))
    for start in range(0, split.num_rows, window):
        part = stored[start : start + window]
        pictures = [StoredPicture.of(cell) for cell in part["image"]]
        for offset, (maker, prediction) in enumerate(zip(part["maker"], classifier.classify(pictures))):
            rows.append(
                {
                    "index": start + offset,
                    "true_maker": maker,
                    "predicted_maker": prediction.maker,
                    "score": prediction.score,
                    "log_probs": list(prediction.log_probs) if prediction.log_probs is not None else None,
                }
            )
    seconds = time.perf_counter() - started
    return EvaluationRun(pd.DataFrame(rows), seconds, classifier.stats.summary())
