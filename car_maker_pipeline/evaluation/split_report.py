"""Evaluate one model on one split and write every result a person or a later step needs.

Shared by the baseline and the per-checkpoint evaluations, so both are scored identically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from car_maker_pipeline.data.tasks import MAKER, Task
from car_maker_pipeline.evaluation.metrics.accuracy import AccuracySummary, as_maker_columns, per_maker_table, summarize
from car_maker_pipeline.evaluation.metrics.figures import confusion_figure, misclassified_figure, save_figure
from car_maker_pipeline.evaluation.scoring.classifier import (
    EvaluationRun,
    MakerClassifier,
    evaluate_split,
    evaluate_split_each,
)
from car_maker_pipeline.storage import atomic_directory


@dataclass
class EvaluationReport:
    out_dir: str
    split: str
    summary: AccuracySummary
    images_per_second: float
    sample_cap: int | None
    # ThroughputStats.summary(): image tokens per image (mean, p95), prompt tokens computed / real,
    # forward passes per image. Empty in reports written before these were recorded.
    throughput: dict[str, float] = field(default_factory=dict)

    @property
    def predictions_path(self) -> Path:
        return Path(self.out_dir) / "predictions.parquet"

    @property
    def per_maker_path(self) -> Path:
        return Path(self.out_dir) / "per_maker.parquet"

    @property
    def confusion_path(self) -> Path:
        return Path(self.out_dir) / "confusion_matrix.png"

    @property
    def misclassified_path(self) -> Path:
        return Path(self.out_dir) / "misclassified.png"

    def per_maker(self) -> pd.DataFrame:
        return pd.read_parquet(self.per_maker_path)

    def predictions(self) -> pd.DataFrame:
        return pd.read_parquet(self.predictions_path)

    def to_json(self) -> dict:
        payload = asdict(self)
        payload["summary"] = asdict(self.summary)
        return payload

    @classmethod
    def from_json(cls, payload: dict) -> EvaluationReport:
        payload = dict(payload)
        payload["summary"] = AccuracySummary(**payload["summary"])
        return cls(**payload)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            **self.summary.as_metrics(prefix),
            f"{prefix}images_per_second": self.images_per_second,
            **{f"{prefix}{name}": value for name, value in self.throughput.items()},
        }

    def describe(self) -> str:
        """One line for a log: accuracy, its interval, the number of images and the speed."""
        summary = self.summary
        return (
            f"{summary.accuracy:.1%} [{summary.ci_low:.1%}, {summary.ci_high:.1%}] "
            f"on {summary.num_images} images at {self.images_per_second:.1f} images/s"
        )


def evaluate_to_dir(
    classifier: MakerClassifier,
    dataset,
    split: str,
    out_dir: Path,
    title: str,
    max_images: int | None = None,
    figures: bool = True,
    task: Task = MAKER,
) -> EvaluationReport:
    """Classify a split and write predictions, per-maker table, figures and a summary atomically."""
    run = evaluate_split(classifier, dataset[split], max_images=max_images, task=task)
    return write_report(run, classifier.makers, dataset[split], split, out_dir, title, max_images, figures, task)


@dataclass(frozen=True)
class ReportTarget:
    """Where and how one adapter's evaluation of a split is written (`evaluate_each_to_dir`)."""

    adapter: str | None
    out_dir: Path
    title: str
    figures: bool = True


def evaluate_each_to_dir(
    classifier: MakerClassifier, dataset, split: str, targets: list[ReportTarget], task: Task = MAKER
) -> list:
    """`evaluate_to_dir` for each target's adapter of the classifier's model, in one pass over the
    split's pictures (each read and prepared once, `evaluate_split_each`); the reports in target order."""
    runs = evaluate_split_each(classifier, dataset[split], [target.adapter for target in targets], task=task)
    answers, part = classifier.makers, dataset[split]
    return [
        write_report(runs[t.adapter], answers, part, split, t.out_dir, t.title, None, t.figures, task) for t in targets
    ]


def write_report(
    run: EvaluationRun,
    makers: list[str],
    part,
    split: str,
    out_dir: Path,
    title: str,
    max_images: int | None = None,
    figures: bool = True,
    task: Task = MAKER,
) -> EvaluationReport:
    """One evaluation's predictions, per-maker table, figures (pictures from `part`) and summary, written atomically.

    For the class task `makers` are the class names: the summary and the per-answer table are about classes, and
    the confusion matrix is left out (196 x 196 cells say nothing in a picture; `class_task` lists the confused pairs).
    """
    # The accuracy tables read true_maker / predicted_maker: the class task's answers stand in for them.
    answers = as_maker_columns(run.predictions, task.true_column, task.predicted_column)
    summary = summarize(answers, makers)
    with atomic_directory(out_dir) as tmp:
        run.predictions.to_parquet(tmp / "predictions.parquet", index=False)
        per_maker_table(answers, makers).to_parquet(tmp / "per_maker.parquet", index=False)
        if figures and task == MAKER:
            save_figure(
                confusion_figure(answers, makers, f"{title}: {summary.accuracy:.1%}"), tmp / "confusion_matrix.png"
            )
        if figures:
            save_figure(
                misclassified_figure(answers, _LazyImages(part), f"{title}: misclassified"), tmp / "misclassified.png"
            )
        report = EvaluationReport(str(out_dir), split, summary, run.images_per_second, max_images, run.throughput)
        (tmp / "summary.json").write_text(json.dumps(report.to_json(), indent=2))
    return report


class _LazyImages:
    """Decode only the images a figure shows."""

    def __init__(self, part):
        self.part = part

    def __getitem__(self, index: int):
        return self.part[index]["image"]
