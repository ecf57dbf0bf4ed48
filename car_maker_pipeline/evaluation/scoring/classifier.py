"""Classify car images into makers with a vision-language model, always answering a valid maker.

The model is never free to ramble: it only scores the makers' answers (each maker's tokens followed
by the end-of-turn token), so every image gets exactly one maker and nothing is dropped for failing
to parse. Every maker's whole answer is scored, so each image gets a probability for every maker
(normalised over the makers) and the prediction is the most probable one. Images are processed in
left-padded batches: one pass over the prompts, one batched pass over all the answers.
"""

from __future__ import annotations

import copy
import queue
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from car_maker_pipeline.data.tasks import MAKER, Task
from car_maker_pipeline.evaluation.scoring.answers import (
    END_OF_TURN,
    AnswerTrie,
    ClassifierError,
    answer_token_ids,
    score_answers,
)
from car_maker_pipeline.evaluation.scoring.inputs import (
    StoredPicture,
    opened,
    pixel_bounded_batches,
    prefetched,
    ready_size,
)
from car_maker_pipeline.evaluation.scoring.throughput import ThroughputStats
from car_maker_pipeline.evaluation.settings import DEFAULT_PREFETCH, DRAFT_DECODE, PROCESS_ON_DEVICE
from car_maker_pipeline.machine import machine_prepare_workers
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget, image_token_count
from car_maker_pipeline.model_inputs.images import MAX_BATCH_PIXELS, model_ready
from car_maker_pipeline.model_inputs.prompt import PromptTemplate


@dataclass(frozen=True)
class Prediction:
    maker: str
    score: float  # probability of the chosen maker, normalised over the makers
    # log-probability of every maker (the classifier's order), normalised over the makers; None from
    # a greedy decoder, which scores only the path it takes
    log_probs: tuple[float, ...] | None = None


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
        workers: int | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        draft_decode: bool = DRAFT_DECODE,
        process_on_device: bool = PROCESS_ON_DEVICE,
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
        # Threads preparing batches ahead of the model (None: `machine_prepare_workers`), and how many
        # prepared batches may wait for it (the memory bound: `prefetch` + 1 batches at a time).
        self.prefetch = max(1, prefetch)
        self.draft_decode = draft_decode  # large stored JPEGs decoded at a reduced size (`opened`)
        # Processors free for a thread to use: one is never called by two threads at once (a tokenizer
        # is not thread-safe). Copies are made before the threads start, never of one in use.
        self._processors: queue.SimpleQueue = queue.SimpleQueue()
        self._processors.put(processor)
        self._processor_count = 1
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
        self.workers = machine_prepare_workers(self.device.type == "cuda") if workers is None else max(0, workers)
        # The image processor's work on the model's GPU (never on a CPU model: there it is the same CPU).
        self.process_on = self.device if process_on_device and self.device.type == "cuda" else None

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

    def _run_batch(self, images: Sequence, decoder=None) -> list[Prediction]:
        """One batch of model-ready pictures, every maker scored; a `decoder(model, inputs, trie, pad_id)`
        replaces that with a greedy path (the benchmark times greedy trie decoding and `generate` so)."""
        return self._score(self._prepare(images), self.stats, decoder)

    def _prepare(self, images: Sequence) -> PreparedBatch:
        """The CPU half of a batch, which needs no model: the processor's tensors of model-ready pictures
        (in pinned memory when the model is on CUDA, so the copy to the device can overlap)."""
        processor = self._processors.get()
        on_device = {"device": self.process_on} if self.process_on is not None else {}
        try:
            inputs = processor(
                images=[[image] for image in images],
                text=[self.prompt_text] * len(images),
                padding=True,
                return_tensors="pt",
                **on_device,
            )
        finally:
            self._processors.put(processor)
        pin = self.device.type == "cuda"
        tensors = {
            name: value.pin_memory() if pin and torch.is_tensor(value) and value.device.type == "cpu" else value
            for name, value in inputs.items()
        }
        return PreparedBatch(tensors, [self.image_tokens(image) for image in images])

    @torch.inference_mode()
    def _score(self, batch: PreparedBatch, stats: ThroughputStats, decoder=None) -> list[Prediction]:
        """The model's half: a prepared batch on the device, every maker's answer scored (or `decoder`'s path)."""
        inputs = {
            name: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
            for name, value in batch.inputs.items()
        }
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        decoder = decoder or self.decoder
        if decoder is None:
            decoded = score_answers(self.model, inputs, self.makers, [self.answers[m] for m in self.makers])
        else:
            decoded = decoder(self.model, inputs, self.trie, self.pad_id)
        mask = inputs["attention_mask"]
        stats.add_batch(
            real_tokens=int(mask.sum()),
            padded_tokens=int(mask.numel()),
            forward_passes=decoded.forward_passes,
            image_tokens=batch.image_tokens,
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
        return self.classify_each(images, [None], {None: self.stats}).predictions[None]

    def classify_each(
        self, images: Iterable, adapters: Sequence[str | None], stats: dict | None = None, warm_up: bool = False
    ) -> OnePass:
        """`classify` under each of the model's `adapters` (PEFT adapter names; None: the model as it is),
        preparing every batch once: each is decoded and processed, then scored by every adapter in turn.

        Scoring 8 checkpoints of one run so costs one preparation of the pictures instead of 8 (LFM2-VL's
        image processor alone is most of the evaluation at realistic photo sizes). `stats` (per adapter)
        are added to; `warm_up` scores the first batch once untimed first (one-off kernel and allocator
        set-up). The active adapter is restored afterwards.
        """
        images = list(images)
        stats = stats if stats is not None else {adapter: ThroughputStats() for adapter in adapters}
        result = OnePass({adapter: [None] * len(images) for adapter in adapters}, dict.fromkeys(adapters, 0.0))
        active = getattr(self.model, "active_adapter", None) if any(a is not None for a in adapters) else None
        try:
            for chunk, batch in self._prepared_batches(images):
                if warm_up:
                    started = time.perf_counter()
                    self._score(batch, ThroughputStats())
                    result.warm_up_seconds, warm_up = time.perf_counter() - started, False
                for adapter in adapters:
                    started = time.perf_counter()
                    if adapter is not None:
                        self.model.set_adapter(adapter)
                    predictions = self._score(batch, stats[adapter])
                    result.model_seconds[adapter] += time.perf_counter() - started
                    for index, prediction in zip(chunk, predictions):
                        result.predictions[adapter][index] = prediction
                del batch  # its tensors go now, not once the next batch is prepared beside them
        finally:
            if active is not None:
                self.model.set_adapter(active)
        return result

    def _prepared_batches(self, images: list):
        """(indices, prepared batch) for every batch of `images`, cost-sorted within each window, in
        order; prepared by `workers` threads up to `prefetch` batches ahead of the model (`prefetched`)."""

        def prepare(chunk: list[int]) -> tuple[list[int], PreparedBatch]:
            drafts = self.processor.image_processor if self.draft_decode else None
            return chunk, self._prepare([model_ready(opened(images[i], drafts)) for i in chunk])

        while self._processor_count < self.workers:
            self._processors.put(copy.deepcopy(self.processor))
            self._processor_count += 1
        return prefetched(self._chunks(images), prepare, self.workers, self.prefetch)

    def _chunks(self, images: list):
        window = self.batch_size * self.sort_window
        for start in range(0, len(images), window):
            sizes = {i: ready_size(images[i]) for i in range(start, min(start + window, len(images)))}
            ordered = sorted(sizes, key=lambda i: (self.image_tokens(sizes[i]), i))
            yield from pixel_bounded_batches(ordered, sizes, self.batch_size, self.max_batch_pixels)


@dataclass
class PreparedBatch:
    """A batch as the processor made it (CPU tensors), with each picture's image tokens."""

    inputs: dict
    image_tokens: list[int]


@dataclass
class OnePass:
    """`classify_each`'s answers per adapter, in input order, and where its time went."""

    predictions: dict[str | None, list]
    model_seconds: dict[str | None, float]  # per adapter: its forward passes
    warm_up_seconds: float = 0.0


@dataclass
class EvaluationRun:
    # index, true_maker, predicted_maker, score, log_probs (every answer's, in the classifier's order);
    # true_class and predicted_class instead for the class task
    predictions: pd.DataFrame
    seconds: float
    throughput: dict[str, float] = field(default_factory=dict)  # ThroughputStats.summary() of the timed pass

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else float("nan")


def evaluate_split(
    classifier: MakerClassifier, split, max_images: int | None = None, task: Task = MAKER
) -> EvaluationRun:
    """Classify every image of a maker-dataset split (or the first `max_images`) with the model as it is."""
    return evaluate_split_each(classifier, split, [None], max_images, task)[None]


def evaluate_split_each(
    classifier: MakerClassifier,
    split,
    adapters: Sequence[str | None],
    max_images: int | None = None,
    task: Task = MAKER,
) -> dict[str | None, EvaluationRun]:
    """`evaluate_split` under each of the model's `adapters`, every picture read and prepared once.

    Rows are read one sorting window at a time as undecoded bytes (`classify` sorts them by cost and
    decodes a batch at a time, `StoredPicture`), so memory holds one window's compressed files and
    one batch's pixels (at most `max_batch_pixels`), whatever the split's size. The first batch is
    scored once untimed (the first forward pass pays one-off set-up, which would dominate images/s
    on a small split). The right answers are the `task`'s column (makers, or class names for the class
    task; the classifier's answers must be of the same kind). Each adapter's `seconds` are its own forward passes plus an equal share of
    the rest (reading, preparing), so they add up to the pass's wall time.
    """
    if split.num_rows == 0:
        raise ClassifierError(
            "The split to evaluate is empty; materialize car_maker_dataset with a non-empty test split."
        )
    if max_images is not None:
        split = split.select(range(min(max_images, split.num_rows)))
    adapters = list(adapters)
    stats = {adapter: ThroughputStats() for adapter in adapters}
    model_seconds, rows = dict.fromkeys(adapters, 0.0), {adapter: [] for adapter in adapters}
    started, warm_up = time.perf_counter(), 0.0
    window = classifier.batch_size * classifier.sort_window
    import datasets  # here, not at module load: a machine that only classifies pictures needs no datasets

    stored = split.cast_column("image", datasets.Image(decode=False))
    for start in range(0, split.num_rows, window):
        part = stored[start : start + window]
        pictures = [StoredPicture.of(cell) for cell in part["image"]]
        one = classifier.classify_each(pictures, adapters, stats, warm_up=start == 0)
        warm_up += one.warm_up_seconds
        for adapter in adapters:
            model_seconds[adapter] += one.model_seconds[adapter]
            for offset, (truth, prediction) in enumerate(zip(part[task.label_column], one.predictions[adapter])):
                rows[adapter].append(
                    {
                        "index": start + offset,
                        task.true_column: truth,
                        task.predicted_column: prediction.maker,
                        "score": prediction.score,
                        "log_probs": list(prediction.log_probs) if prediction.log_probs is not None else None,
                    }
                )
    shared = (time.perf_counter() - started - warm_up - sum(model_seconds.values())) / len(adapters)
    return {
        adapter: EvaluationRun(pd.DataFrame(rows[adapter]), model_seconds[adapter] + shared, stats[adapter].summary())
        for adapter in adapters
    }
