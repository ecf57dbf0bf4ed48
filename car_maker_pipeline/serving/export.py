"""The champion exported merged: one plain transformers folder, checked against the adapter it came from.

The adapter model is scored on the test split first, then merged (`models.merging`) and scored again
with the same evaluator, prompt and maker list; the two sets of answers are compared image by image
and both speeds are recorded, before the folder is written through a temporary name and a rename.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from car_maker_pipeline.storage import atomic_directory

# Probabilities of the adapter and the merged model differ by float rounding only (the merge adds
# B @ A into W once, instead of at every forward pass); more than this means the merge went wrong.
PROBABILITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class MergedExport:
    path: str
    registered_model: str
    version: str
    num_images: int
    accuracy: float  # the merged model's, on the split it was checked on
    adapter_accuracy: float
    agreement: float  # share of images given the same maker by both
    max_probability_difference: float
    merged_images_per_second: float
    adapter_images_per_second: float
    size_bytes: int

    @property
    def identical_answers(self) -> bool:
        return self.agreement == 1.0 and self.max_probability_difference <= PROBABILITY_TOLERANCE

    def to_json(self) -> dict:
        return asdict(self)


def compare_answers(adapter: pd.DataFrame, merged: pd.DataFrame) -> tuple[float, float]:
    """(share of equal makers, largest probability difference) between two evaluation runs of the same images."""
    if list(adapter["index"]) != list(merged["index"]):
        raise ValueError("The two evaluations did not score the same images in the same order.")
    same = (adapter["predicted_maker"].to_numpy() == merged["predicted_maker"].to_numpy()).mean()
    difference = (adapter["score"] - merged["score"]).abs().max()
    return float(same), float(difference)


def export_merged(
    predictor,
    split,
    out_dir: Path,
    *,
    registered_model: str,
    version: str,
    max_images: int | None = None,
) -> tuple[MergedExport, pd.DataFrame, pd.DataFrame]:
    """Merge `predictor`'s adapter into its base model, check it on `split`, write it to `out_dir`.

    Returns the export record and both runs' predictions (index, true_maker, predicted_maker, score; the class
    task's as true_maker / predicted_maker too). `predictor` is consumed: its model holds the merged weights afterwards.
    """
    from car_maker_pipeline.data.tasks import get_task
    from car_maker_pipeline.evaluation.metrics.accuracy import as_maker_columns, summarize
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
    from car_maker_pipeline.models.merging import merge_adapter, save_merged

    adapter_classifier = predictor.classifier
    makers = adapter_classifier.makers
    task = get_task(predictor.card.task)
    adapter_run = evaluate_split(adapter_classifier, split, max_images=max_images, task=task)
    merged_model = merge_adapter(adapter_classifier.model)
    merged_classifier = MakerClassifier(
        merged_model,
        adapter_classifier.processor,
        makers,
        prompt=adapter_classifier.prompt,
        batch_size=adapter_classifier.batch_size,
        budget=adapter_classifier.budget,
    )
    merged_run = evaluate_split(merged_classifier, split, max_images=max_images, task=task)
    adapter_answers, merged_answers = (
        as_maker_columns(run.predictions, task.true_column, task.predicted_column) for run in (adapter_run, merged_run)
    )
    agreement, difference = compare_answers(adapter_answers, merged_answers)
    card = {
        "makers": makers,
        "system_prompt": adapter_classifier.prompt.system,
        "user_prompt": adapter_classifier.prompt.user,
        "image_token_budget": adapter_classifier.budget.to_json(),
        "registered_model": registered_model,
        "version": version,
        "answer": "every maker's answer (its tokens, then <|im_end|>) scored; the most probable maker wins",
        # probabilities are softmax(log p / temperature); below confidence_threshold the answer is "unsure"
        "temperature": predictor.card.temperature,
        "confidence_threshold": predictor.card.confidence_threshold,
        "target_precision": predictor.card.target_precision,
        # the class task: makers are the class names; below the class threshold the maker threshold climbs
        "task": task.name,
        "maker_threshold": predictor.card.maker_threshold,
    }
    with atomic_directory(out_dir) as tmp:
        save_merged(merged_model, adapter_classifier.processor, tmp, card)
        size = sum(path.stat().st_size for path in tmp.iterdir() if path.is_file())
    record = MergedExport(
        path=str(out_dir),
        registered_model=registered_model,
        version=version,
        num_images=len(merged_answers),
        accuracy=summarize(merged_answers, makers).accuracy,
        adapter_accuracy=summarize(adapter_answers, makers).accuracy,
        agreement=agreement,
        max_probability_difference=difference,
        merged_images_per_second=merged_run.images_per_second,
        adapter_images_per_second=adapter_run.images_per_second,
        size_bytes=size,
    )
    return record, adapter_answers, merged_answers
