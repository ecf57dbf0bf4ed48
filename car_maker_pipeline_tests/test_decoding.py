"""Decoding that skips forced answer tokens, cost-sorted batching, and the image-token budget.

| case                                              | expected                                                   |
|---------------------------------------------------|------------------------------------------------------------|
| demo makers (first token decides)                 | same makers and scores as `generate`; 1 forward pass        |
| makers sharing prefixes (branch after 1st token)  | same as `generate`; passes <= trie branching depth, some > 1 |
| mixed picture sizes through `classify`            | input order kept; answers equal one-at-a-time              |
| sorting vs. no sorting on a mixed-size list       | fewer padded tokens with sorting                           |
| batches under a decoded-pixel bound               | no batch over the bound (a lone picture may be); same answers |
| `evaluate_split`, several batches in one window, 0/1/2 preparing threads, prefetch 1-3 | a batch's decoded pictures freed before the next (but another thread's); at most prefetch + 1 prepared batches alive |
| token count from size vs. the processor           | equal for random sizes, tiny and real processors           |
| budget min > max, max < 1                          | ImageTokenBudgetError naming the setting                   |
| budget applied                                    | the processor makes fewer tokens; the budget in force known |
"""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
from PIL import Image
from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor

from car_maker_pipeline.evaluation.scoring.answers import decode
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
from car_maker_pipeline.evaluation.scoring.inputs import pixel_bounded_batches
from car_maker_pipeline.evaluation.scoring.reference import generate_decode
from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget, ImageTokenBudgetError, image_token_count
from car_maker_pipeline.offline.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_processor, build_tokenizer

DEMO_MAKERS = ["AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce"]
# Names sharing their first tokens, so the answer branches again after the first choice.
SHARED_PREFIX_MAKERS = ["Aston Martin", "Aston Martinez", "Land Rover", "Land Rovers", "Land Cruiser", "BMW"]
SIZES = [(128, 96), (64, 48), (200, 90), (96, 128), (40, 40), (160, 120), (90, 200), (128, 64)]


def _reference(classifier: MakerClassifier, inputs) -> tuple[list[str], list[float]]:
    decoded = generate_decode(classifier.model, inputs, classifier.trie, classifier.pad_id, classifier.end_id)
    return decoded.makers, decoded.scores


def _images(maker_dataset, count=8):
    pictures = maker_dataset.load()["test"].select(range(count))["image"]
    return [picture.convert("RGB").resize(size) for picture, size in zip(pictures, SIZES)]


@pytest.mark.parametrize("makers", [DEMO_MAKERS, SHARED_PREFIX_MAKERS], ids=["demo", "shared-prefixes"])
def test_decode_equals_generate_with_fewer_passes(tiny_model, maker_dataset, makers):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, makers, batch_size=8)
    images = _images(maker_dataset)
    inputs = dict(
        tiny_model.processor(
            images=[[i] for i in images], text=[classifier.prompt_text] * 8, padding=True, return_tensors="pt"
        )
    )
    decoded = decode(tiny_model.model, inputs, classifier.trie, classifier.pad_id)
    makers_ref, scores_ref = _reference(classifier, inputs)
    assert decoded.makers == makers_ref
    assert decoded.scores == pytest.approx(scores_ref, abs=1e-4)
    assert 1 <= decoded.forward_passes <= 1 + classifier.trie.branching_depth()
    if makers is DEMO_MAKERS:
        assert classifier.trie.branching_depth() == 1 and decoded.forward_passes == 1
    else:
        assert classifier.trie.branching_depth() >= 2


def test_forced_branch_really_runs_a_second_pass(tiny_model):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, SHARED_PREFIX_MAKERS, batch_size=4)
    pictures = [Image.new("RGB", (128, 96), color) for color in ("red", "green", "blue", "white")]
    classifier.classify(pictures)
    assert classifier.stats.summary()["forward_passes_per_image"] > 1


def test_classify_keeps_input_order_and_wastes_less(tiny_model, maker_dataset):
    images = _images(maker_dataset) * 2
    sorted_classifier = MakerClassifier(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=4)
    predictions = sorted_classifier.classify(images)
    single = [sorted_classifier.classify_batch([image])[0] for image in images]
    assert [p.maker for p in predictions] == [p.maker for p in single]
    assert [p.score for p in predictions] == pytest.approx([p.score for p in single], abs=1e-4)

    unsorted = MakerClassifier(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=4, sort_window=1)
    unsorted.classify(images)
    with_sorting = MakerClassifier(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=4, sort_window=8)
    with_sorting.classify(images)
    assert with_sorting.stats.real_tokens == unsorted.stats.real_tokens
    assert with_sorting.stats.padded_tokens < unsorted.stats.padded_tokens
    assert with_sorting.stats.summary()["padded_to_real_tokens"] == pytest.approx(1.0, abs=0.05)


# (picture areas in order, batch size, pixel bound) -> batches (indices)
PIXEL_BOUND_CASES = [
    ([10, 10, 10, 10], 2, 100, [[0, 1], [2, 3]]),  # the batch size decides
    ([10, 10, 10, 10], 8, 25, [[0, 1], [2, 3]]),  # the pixel bound decides
    ([10, 30, 10], 8, 25, [[0], [1], [2]]),  # a picture over the bound goes alone, never dropped
    ([5, 5, 20, 5, 5], 8, 20, [[0, 1], [2], [3, 4]]),  # exactly at the bound still fits
    ([], 4, 10, []),
]


@pytest.mark.parametrize(("areas", "batch_size", "bound", "expected"), PIXEL_BOUND_CASES)
def test_pixel_bounded_batches(areas, batch_size, bound, expected):
    sizes = {index: (area, 1) for index, area in enumerate(areas)}
    assert pixel_bounded_batches(list(range(len(areas))), sizes, batch_size, bound) == expected


class _BatchRecorder(MakerClassifier):
    """The real classifier, noting the decoded pixels of every batch it runs."""

    def _prepare(self, images):
        self.batch_pixels = [*getattr(self, "batch_pixels", []), sum(i.size[0] * i.size[1] for i in images)]
        return super()._prepare(images)


def test_large_pictures_run_in_smaller_batches_with_the_same_answers(tiny_model, maker_dataset):
    pictures = maker_dataset.load()["test"].select(range(12))["image"]
    sizes = [(640, 480), (128, 96), (900, 600), (64, 48)] * 3
    images = [picture.convert("RGB").resize(size) for picture, size in zip(pictures, sizes)]
    bound = 900 * 600 + 640 * 480  # one large pair fits, three large pictures do not
    bounded = _BatchRecorder(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=8, max_batch_pixels=bound)
    free = _BatchRecorder(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=8, max_batch_pixels=10**9)
    answers, reference = bounded.classify(images), free.classify(images)
    assert max(bounded.batch_pixels) <= bound < max(free.batch_pixels)
    assert len(bounded.batch_pixels) > len(free.batch_pixels)
    assert [p.maker for p in answers] == [p.maker for p in reference]
    assert [p.score for p in answers] == pytest.approx([p.score for p in reference], abs=1e-4)


class _PixelLifetimes(MakerClassifier):
    """The real classifier, checking at each batch that no earlier batch's pictures are still alive
    (beyond those other preparing threads hold), and at each forward pass how many prepared batches are."""

    def _prepare(self, images):
        gc.collect()
        with self.lock:
            self.alive_before_batch.append(sum(r() is not None for r in self.seen))
            self.seen += [weakref.ref(image) for image in images]
        batch = super()._prepare(images)
        with self.lock:
            self.prepared.append(weakref.ref(batch))
        return batch

    def _score(self, batch, stats, decoder=None):
        gc.collect()
        with self.lock:
            self.prepared_alive.append(sum(r() is not None for r in self.prepared))
        return super()._score(batch, stats, decoder)


@pytest.fixture
def heap_made_before_frozen(tiny_model, maker_dataset):
    """The objects that exist before the test (torch, transformers, the model: a quarter of a second for each
    `gc.collect()` to walk) kept out of the collections: those then walk only what the test made, which is
    everything whose lifetime it checks. They stay frozen after it, as what collection built does for the
    session (conftest.py): `gc.unfreeze()` would thaw that too."""
    gc.collect()
    gc.freeze()


@pytest.mark.parametrize(("workers", "prefetch"), [(0, 2), (1, 1), (2, 1), (2, 3)])
@pytest.mark.usefixtures("heap_made_before_frozen")
def test_evaluate_split_frees_each_batch_of_pixels_before_the_next(tiny_model, maker_dataset, workers, prefetch):
    classifier = _PixelLifetimes(
        tiny_model.model,
        tiny_model.processor,
        DEMO_MAKERS,
        batch_size=4,
        sort_window=8,
        workers=workers,
        prefetch=prefetch,
    )
    classifier.lock, classifier.seen, classifier.prepared = threading.Lock(), [], []
    classifier.alive_before_batch, classifier.prepared_alive = [], []
    run = evaluate_split(classifier, maker_dataset.load()["test"], max_images=20)
    assert len(run.predictions) == 20
    assert len(classifier.alive_before_batch) == 5  # 20 pictures in batches of 4, the warm-up reusing the first
    others = max(0, workers - 1) * 4  # pictures another thread may be preparing at the same time
    assert max(classifier.alive_before_batch) <= others, "decoded pictures of finished batches were still held"
    in_flight = 1 if workers == 0 else prefetch + 1  # the one scored, and those prepared ahead
    assert max(classifier.prepared_alive) <= in_flight, classifier.prepared_alive


@pytest.mark.parametrize("kind", ["tiny", "real"])
def test_token_count_from_size_equals_the_processor(kind):
    tokenizer = build_tokenizer()
    processor = (
        build_processor()
        if kind == "tiny"
        else Lfm2VlProcessor(image_processor=Lfm2VlImageProcessor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rng = np.random.default_rng(7)
    for _ in range(25):
        width, height = int(rng.integers(20, 4500)), int(rng.integers(20, 2500))
        if max(width, height) > 8 * min(width, height):
            continue
        encoded = processor(images=[[Image.new("RGB", (width, height))]], text=[IMAGE_TOKEN], return_tensors="pt")
        assert image_token_count(processor.image_processor, width, height) == int(
            (encoded["input_ids"] == image_id).sum()
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"min_image_tokens": 300, "max_image_tokens": 100}, "min_image_tokens"), ({"max_image_tokens": 0}, "at least 1")],
)
def test_bad_budgets_are_refused(settings, message):
    with pytest.raises(ImageTokenBudgetError, match=message):
        ImageTokenBudget(**settings)


def test_budget_bounds_the_tokens_of_a_large_photo():
    processor = Lfm2VlProcessor(
        image_processor=Lfm2VlImageProcessor(), tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE
    )
    before = image_token_count(processor.image_processor, 1600, 1200)
    in_force = ImageTokenBudget(max_image_tokens=64, do_image_splitting=False).apply(processor)
    assert in_force == ImageTokenBudget(min_image_tokens=64, max_image_tokens=64, do_image_splitting=False)
    assert before == 1770 and image_token_count(processor.image_processor, 1600, 1200) <= 64
