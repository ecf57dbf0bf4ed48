"""The training data as TRL sees it: prompt/completion vision examples built from `image` + `maker` rows.

Each row becomes a TRL prompt/completion vision example: the prompt is `PromptTemplate().messages(makers)`
(system message, then the image and the question with the list of makers), the completion is the
assistant's bare maker name, and the image rides along in the `image` column. TRL's
`DataCollatorForVisionLanguageModeling` then renders prompt and completion with the processor's
chat template, tokenizes them separately and sets the labels of every prompt token (system text,
image placeholders, question, `<|im_start|>assistant\\n`) and of the padding to -100: the loss is on
the answer tokens, the `<|im_end|>` that closes the turn and the newline the template writes after it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from car_maker_pipeline.model_inputs.image_tokens import image_token_count
from car_maker_pipeline.model_inputs.images import model_ready, padded_size
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.training.config import LENGTH_COLUMN, LoraTrainingError


def check_training_data(dataset, makers: Sequence[str], label_column: str = "maker") -> list[str]:
    """The dataset's answers (its `label_column`: makers, or class names for the class task); raises if a
    column is missing, it is empty or has an answer not in `makers`."""
    missing = [c for c in ("image", label_column) if c not in dataset.column_names]
    if missing:
        raise LoraTrainingError(
            f"The training data needs columns 'image' and {label_column!r}; missing {missing} "
            f"(has {dataset.column_names})."
        )
    if len(dataset) == 0:
        raise LoraTrainingError("The training data is empty.")
    labels = list(dataset[label_column])
    unknown = sorted(set(labels) - set(makers))
    if unknown:
        raise LoraTrainingError(
            f"Answers {unknown} appear in the data's {label_column!r} but not in the answer list {list(makers)}."
        )
    return labels


def build_sft_dataset(
    dataset, makers: Sequence[str], prompt: PromptTemplate | None = None, processor=None, label_column: str = "maker"
):
    """Turn an `image` + `maker` dataset into a TRL prompt/completion vision dataset (checked first).

    Columns: `prompt` (the chat messages up to the answer, one image placeholder), `completion`
    (the assistant message with the bare maker name) and `image` (TRL's collator turns it into
    `images=[image]`). The image column is carried over without being decoded or re-encoded; a
    read-time transform prepares each picture exactly as the evaluator does, so train = test.
    With `processor`, a `length` column holds each picture's image tokens under that processor
    (from the image header, nothing decoded), for batching pictures of similar cost together.
    """
    prompt = prompt or PromptTemplate()
    makers = list(makers)
    labels = check_training_data(dataset, makers, label_column)
    messages = prompt.messages(makers)
    extra = [c for c in dataset.column_names if c not in ("image", label_column)]
    out = dataset.remove_columns(extra) if extra else dataset
    out = out.add_column("prompt", [messages] * len(out))
    out = out.add_column("completion", [prompt.answer_messages(m) for m in labels])
    out = out.remove_columns([label_column])
    if processor is not None:
        out = out.add_column(LENGTH_COLUMN, image_token_lengths(dataset, processor))
    # LFM2-VL's image processor fails on grayscale, palette, RGBA and CMYK pictures and on batches mixing
    # extreme strips with photos: prepare on read.
    return out.with_transform(_model_ready_images)


def image_token_lengths(dataset, processor) -> list[int]:
    """Image tokens of every picture of `dataset` under `processor`, read from the stored bytes' headers."""
    cells = dataset.with_format("arrow")["image"].to_pylist()
    lengths = []
    for cell in cells:
        with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as opened:
            width, height = padded_size(*opened.size)
        lengths.append(image_token_count(processor.image_processor, width, height))
    return lengths


def _model_ready_images(batch: dict[str, list]) -> dict[str, list]:
    if "image" in batch:  # a read of other columns alone (the sampler's lengths) decodes nothing
        batch["image"] = [model_ready(image) for image in batch["image"]]
    return batch
