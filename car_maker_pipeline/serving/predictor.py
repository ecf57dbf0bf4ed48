"""The predictor behind every way the classifier leaves the pipeline: the MLflow pyfunc model, the
`classify` command and the batch predictions all load and predict through `MakerPredictor`, so they
give the same maker for the same image.

It is the checkpoint evaluator's own `MakerClassifier` (constrained decoding, the same prompt and
image-token budget) on the base model with the registered LoRA adapter attached; `ClassifierCard`
is everything besides the adapter weights that this needs, recorded when the adapter is registered.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.serving.images import ImageInputError, decode_image

# In: one image per row, as encoded bytes in this column. Out: one row per image, in input order:
# the most probable maker and its (calibrated) probability; `answer`, which is that maker, or
# UNSURE when the probability is below the registered confidence threshold; `level`, what the answer
# names ("maker" or "unsure"); and the next two makers. A class-task model (`ClassifierCard.task`)
# fills the same columns with classes: `maker`, `maker_2`, `maker_3` are its three most probable
# classes, and `answer` is the class, else its maker, else UNSURE, as `level` says (class, maker, unsure).
IMAGE_COLUMN = "image"
UNSURE = "unsure"
OUTPUT_SCHEMA = (
    ("maker", "string"),
    ("probability", "double"),
    ("answer", "string"),
    ("level", "string"),
    ("maker_2", "string"),
    ("probability_2", "double"),
    ("maker_3", "string"),
    ("probability_3", "double"),
)
OUTPUT_COLUMNS = tuple(name for name, _ in OUTPUT_SCHEMA)
CARD_FILE = "car_maker.json"  # the card beside the adapter weights (`classify --adapter` reads it)
# The pyfunc model's artifacts: the adapter folder (weights, PEFT config, card) and the maker list.
ADAPTER_ARTIFACT, MAKERS_ARTIFACT = "adapter", "makers"


@dataclass(frozen=True)
class ClassifierCard:
    """What a LoRA adapter needs to classify, besides its weights."""

    makers: list[str]
    base_model_id: str  # the Hub id, or for a local folder its name
    base_model_revision: str  # the Hub commit, or the folder's content fingerprint
    base_model_path: str | None = None  # local folders only: where the base model is loaded from
    system_prompt: str | None = None  # None: the task's own (data/tasks.py)
    user_prompt: str | None = None
    image_token_budget: dict = field(default_factory=dict)  # ImageTokenBudget fields; empty: the processor's own
    step: int | None = None
    # Fitted on validation when the checkpoint was scored: probabilities are softmax(log p / temperature),
    # and below `confidence_threshold` (certified for `target_precision`) the answer is "unsure".
    temperature: float = 1.0
    confidence_threshold: float | None = None
    target_precision: float | None = None
    # The certificate: with probability 1 - delta, precision on new images >= certified_precision (None:
    # nothing certified, every answer "unsure"); `certification` says so in words.
    delta: float | None = None
    certified_precision: float | None = None
    certification: str | None = None
    # "maker", or "class": then `makers` holds the class names, `confidence_threshold` is the class
    # threshold and `maker_threshold` the maker one (the hierarchical answer, evaluation/metrics/hierarchy.py).
    task: str = "maker"
    maker_threshold: float | None = None

    @classmethod
    def for_base_model(cls, path_or_id: str, revision: str, makers: list[str], **more) -> ClassifierCard:
        from car_maker_pipeline.models.loading import is_local

        if is_local(path_or_id):
            path = Path(path_or_id).expanduser().resolve()
            return cls(makers, base_model_id=path.name, base_model_revision=revision, base_model_path=str(path), **more)
        return cls(makers, base_model_id=path_or_id, base_model_revision=revision, **more)

    @property
    def base_model(self) -> str:
        """What `from_pretrained` loads: the local folder, or the Hub id."""
        return self.base_model_path or self.base_model_id

    def prompt(self) -> PromptTemplate:
        from car_maker_pipeline.data.tasks import get_task

        return get_task(self.task).prompt(self.makers, self.system_prompt, self.user_prompt)

    def model_config(self) -> dict:
        """The pyfunc model's `model_config` (the maker list travels as an artifact of its own)."""
        config = {key: value for key, value in asdict(self).items() if key != "makers" and value is not None}
        return config

    @classmethod
    def from_model_config(cls, config: dict, makers: list[str]) -> ClassifierCard:
        known = {name for name in cls.__dataclass_fields__ if name != "makers"}
        return cls(makers=list(makers), **{key: value for key, value in config.items() if key in known})

    def write(self, folder: Path) -> Path:
        path = folder / CARD_FILE
        # `base_model` keeps cards readable by earlier versions of `classify --adapter`.
        path.write_text(json.dumps({**asdict(self), "base_model": self.base_model}, indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, folder: Path) -> ClassifierCard:
        """The card beside an adapter; earlier cards held only makers, base_model, its revision and step."""
        payload = json.loads((folder / CARD_FILE).read_text())
        if "base_model_id" in payload:
            known = set(cls.__dataclass_fields__)
            return cls(**{key: value for key, value in payload.items() if key in known})
        return cls.for_base_model(
            payload["base_model"], payload.get("base_model_revision", ""), payload["makers"], step=payload.get("step")
        )


def answer_table(predictions, card: ClassifierCard) -> pd.DataFrame:
    """The output rows of classifier `Prediction`s: calibrated top three, the answer and its level."""
    import numpy as np

    from car_maker_pipeline.evaluation.metrics.calibration import softmax

    answers, rows = card.makers, []
    # A greedy decoder scores only the chosen answer (no log_probs); every other row is calibrated at once.
    scored = {index: row for row, index in enumerate(i for i, p in enumerate(predictions) if p.log_probs is not None)}
    calibrated = softmax(np.asarray([predictions[i].log_probs for i in scored]), card.temperature) if scored else None
    climbed = _climbed(calibrated, card) if scored else None
    for index, prediction in enumerate(predictions):
        if index in scored:
            probabilities = calibrated[scored[index]]
            top = [(answers[i], float(probabilities[i])) for i in np.argsort(-probabilities, kind="stable")[:3]]
        else:
            top = [(prediction.maker, float(prediction.score))]
        top += [(None, float("nan"))] * (3 - len(top))
        if climbed is not None and index in scored:
            answer, level = climbed[scored[index]]
        else:
            sure = card.confidence_threshold is None or top[0][1] >= card.confidence_threshold
            answer, level = (top[0][0], card.task) if sure else (UNSURE, UNSURE)
        rows.append(
            {
                "maker": top[0][0],
                "probability": top[0][1],
                "answer": answer,
                "level": level,
                "maker_2": top[1][0],
                "probability_2": top[1][1],
                "maker_3": top[2][0],
                "probability_3": top[2][1],
            }
        )
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype({name: "float64" if kind == "double" else object for name, kind in OUTPUT_SCHEMA})


def _climbed(calibrated, card: ClassifierCard) -> list[tuple[str, str]] | None:
    """A class-task card's (answer, level) per row of calibrated class probabilities: the class when its
    probability passes the class threshold, else the most probable maker when its summed probability passes
    the maker threshold, else unsure. None for a maker-task card."""
    if card.task != "class":
        return None
    from car_maker_pipeline.evaluation.class_task import class_tree
    from car_maker_pipeline.evaluation.metrics.certification import NOTHING_ANSWERED
    from car_maker_pipeline.evaluation.metrics.hierarchy import LEVELS, climb

    tree = class_tree(card.makers)
    class_threshold = 0.0 if card.confidence_threshold is None else card.confidence_threshold
    maker_threshold = NOTHING_ANSWERED if card.maker_threshold is None else card.maker_threshold
    climbed = climb(calibrated, tree, class_threshold, maker_threshold)
    return list(zip(climbed.answers(tree), (LEVELS[level] for level in climbed.level)))


class MakerPredictor:
    """Images or image bytes in, one row per image out (see OUTPUT_SCHEMA), in input order.

    Safe to share between threads (the scoring server answers requests on a thread pool): one batch
    runs at a time, which on one accelerator is also what is fastest.
    """

    def __init__(self, classifier, card: ClassifierCard | None = None):
        self.classifier = classifier
        self.card = card or ClassifierCard(list(classifier.makers), base_model_id="", base_model_revision="")
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, card: ClassifierCard, adapter_dir: Path, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16
    ) -> MakerPredictor:
        from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier
        from car_maker_pipeline.model_inputs.image_tokens import ImageTokenBudget
        from car_maker_pipeline.models.loading import ModelLoadError, attach_adapter, load_model_and_processor

        if card.base_model_path is not None and not Path(card.base_model_path).is_dir():
            raise ModelLoadError(
                f"The classifier's base model {card.base_model_id!r} was registered from the folder "
                f"{card.base_model_path}, which does not exist on this machine. Put the base model there "
                "(on the demo profile, materialize baseline_evaluation to build it), then load the classifier again."
            )
        local = card.base_model_path is not None
        loaded = load_model_and_processor(
            card.base_model, revision=None if local else card.base_model_revision, device=device, dtype=dtype
        )
        if local and card.base_model_revision and loaded.revision != card.base_model_revision:
            raise ModelLoadError(
                f"The base model in {card.base_model_path} has changed since the adapter was registered "
                f"(its fingerprint is {loaded.revision}, the adapter was trained on {card.base_model_revision}). "
                "Restore that base model, or register a classifier trained on this one."
            )
        model = attach_adapter(loaded.model, adapter_dir).eval()
        classifier = MakerClassifier(
            model,
            loaded.processor,
            card.makers,
            prompt=card.prompt(),
            batch_size=batch_size,
            budget=ImageTokenBudget(**card.image_token_budget),
        )
        return cls(classifier, card)

    @property
    def makers(self) -> list[str]:
        return self.classifier.makers

    def predict_images(self, images: Iterable) -> pd.DataFrame:
        from car_maker_pipeline.evaluation.scoring.classifier import ThroughputStats

        images = list(images)
        with self._lock:
            # The evaluator's per-image statistics would grow without bound in a long-running server.
            self.classifier.stats = ThroughputStats()
            predictions = self.classifier.classify(images) if images else []
        return answer_table(predictions, self.card)

    def predict_bytes(self, blobs: Sequence, labels: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per image of encoded `blobs`, in order; `labels` name them in errors (default `row <i>`).

        Every image is decoded once first, one at a time, its pixels dropped at once: one bad image
        fails the call (naming it) before any model work, and memory never holds more than one of
        them. Then the classifier decodes each batch again as it runs (`ServedPicture`), so peak
        memory is one batch of pixels (`MAX_BATCH_PIXELS`), whatever the number of images.
        """
        labels = list(labels) if labels is not None else [f"row {row}" for row in range(len(blobs))]
        pictures = []
        for blob, label in zip(blobs, labels):
            try:
                with decode_image(blob) as image:
                    size = image.size
            except ImageInputError as error:
                raise ImageInputError(f"{label}: {error}") from error
            pictures.append(ServedPicture(bytes(blob), size))
        return self.predict_images(pictures)


@dataclass(frozen=True)
class ServedPicture:
    """Image bytes from outside, already checked by `decode_image`: the upright size is known, and
    the pixels are decoded (upright, by the same rule) only when the picture's batch runs and dropped
    with it (the classifier opens anything with `size` and `open()` that way, as its `StoredPicture`)."""

    data: bytes
    size: tuple[int, int]

    def open(self):
        return decode_image(self.data)
