"""Experiment: the class task's model against the maker task's, on the demo, over 3 seeds.

    python bench/bench_class_quality.py              # 3 seeds x 2 tasks, 400 steps each (~15 min on 2 cores)
    python bench/bench_class_quality.py --small      # 1 seed, 120 steps

What is compared
----------------
Data: a demo source (6 makers, the classes of each drawn apart by body type and year, see
`offline/body_styles.py`), TRAIN_PER_MAKER train pictures per maker (VALIDATION_FRACTION of them carved
off as validation, more than the pipeline's tenth so that a target can be certified) and TEST_PER_MAKER
test pictures per maker. Model: tiny-s. For each seed, two LoRA runs with the same
settings (`LoraHyperparameters` defaults, `max_steps`, balanced sampling, that seed): one on the maker task
(answers: the 6 makers), one on the class task (answers: the dataset's classes, prompt listing their makers).

Reported per seed and as a mean:

- maker model: test accuracy;
- class model: class accuracy (top-1), top-5, the maker accuracy its answers imply, and the share with the
  right maker but the wrong model;
- at the target precision (`--target`, certified with delta 0.05 on the validation images neither model
  trained on): the maker model's coverage (flat: maker or "unsure", `answer_policy.calibrate`) against the
  class model's hierarchical coverage (class plus maker answers, `class_task.assess_class_answers`), with
  the shares at class and at maker level and the precision of the answers given.

The demo's validation split is small: a target of 99% needs about 700 validation images to be certified
at all (505 answered without error on the threshold fold with 8 class thresholds compared), so the
default target here is 90%, and what 99% gives is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import (  # noqa: E402
    RESULTS_DIR,
    cached_maker_dataset,
    format_table,
    library_versions,
    machine_info,
    quiet_libraries,
    save_results,
)

from car_maker_pipeline.data.dataset_spec import TEST, TRAIN, VALIDATION, column  # noqa: E402
from car_maker_pipeline.data.tasks import CLASS, MAKER  # noqa: E402
from car_maker_pipeline.evaluation.answer_policy import calibrate  # noqa: E402
from car_maker_pipeline.evaluation.class_task import assess_class_answers  # noqa: E402
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split  # noqa: E402
from car_maker_pipeline.models.loading import attach_adapter, load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402
from car_maker_pipeline.training.config import LoraHyperparameters  # noqa: E402
from car_maker_pipeline.training.trainer import train_lora  # noqa: E402

NAME = "bench_class_quality"
TRAIN_PER_MAKER, TEST_PER_MAKER = 150, 40
VALIDATION_FRACTION = 0.4  # 360 validation pictures: enough to certify 90%, as the pipeline's 10% would not be
DELTA = 0.05


def train_and_score(task, answers, seed: int, steps: int, model_dir: Path, data, work: Path, targets) -> dict:
    config = LoraHyperparameters(
        seed=seed, max_steps=steps, checkpoint_every_n_steps=steps, logging_steps=steps, sampling="balanced"
    )
    prompt = task.prompt(answers)
    out = work / f"{task.name}-seed{seed}-steps{steps}-{config.fingerprint()}"  # a finished run is reused
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's log lines would bury the tables
        result = train_lora(model_dir, data[TRAIN], None, answers, out, config, prompt=prompt, task=task)
    loaded = load_model_and_processor(str(model_dir), device="cpu", dtype="float32")
    model = attach_adapter(loaded.model, result.final_checkpoint).eval()
    classifier = MakerClassifier(model, loaded.processor, answers, prompt=prompt, batch_size=32, workers=0)
    started = time.perf_counter()
    runs = {split: evaluate_split(classifier, data[split], task=task).predictions for split in (VALIDATION, TEST)}
    row = {"task": task.name, "seed": seed, "train_seconds": result.train_seconds}
    row["eval_seconds"] = time.perf_counter() - started
    for target in targets:
        suffix = f"@{target:g}"
        if task is MAKER:
            report = calibrate(runs[VALIDATION], runs[TEST], answers, target, delta=DELTA).report
            row["accuracy"] = report.top1_accuracy
            row |= {f"coverage{suffix}": report.coverage, f"precision{suffix}": report.selective_accuracy}
        else:
            report = assess_class_answers(runs[VALIDATION], runs[TEST], answers, target, delta=DELTA).report
            row |= {
                "class_accuracy": report.top1_accuracy,
                "top5_accuracy": report.top5_accuracy,
                "implied_maker_accuracy": report.implied_maker_accuracy,
                "right_maker_wrong_model": report.right_maker_wrong_model,
                f"coverage{suffix}": report.class_share + report.maker_share,
                f"class_share{suffix}": report.class_share,
                f"maker_share{suffix}": report.maker_share,
                f"precision{suffix}": report.answered_precision,
            }
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="1 seed, 120 steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 400)")
    parser.add_argument("--target", type=float, default=0.9, help="target precision (0.99 is reported as well)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    quiet_libraries()
    torch.set_num_threads(1)
    seeds, steps = ([0], 120) if args.small else ([0, 1, 2], 400)
    steps = args.steps or steps
    targets = sorted({args.target, 0.99})
    record = cached_maker_dataset(
        args.work, "class-quality", TRAIN_PER_MAKER, TEST_PER_MAKER, validation_fraction=VALIDATION_FRACTION
    )
    data = record.load()
    classes = CLASS.answers(record.makers, [name for part in data.values() for name in column(part, "source_class")])
    model_dir = args.work / "tiny-s-seed0"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, "tiny-s")
    rows = []
    for seed in seeds:
        for task, answers in ((MAKER, record.makers), (CLASS, classes)):
            rows.append(train_and_score(task, answers, seed, steps, model_dir, data, args.work, targets))
            print(f"{task.name} seed {seed}: {rows[-1]}", flush=True)

    def mean(task: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["task"] == task)

    summary = {
        "maker_accuracy": mean("maker", "accuracy"),
        "class_accuracy": mean("class", "class_accuracy"),
        "class_top5_accuracy": mean("class", "top5_accuracy"),
        "implied_maker_accuracy": mean("class", "implied_maker_accuracy"),
        "right_maker_wrong_model": mean("class", "right_maker_wrong_model"),
        **{f"maker_model_coverage@{t:g}": mean("maker", f"coverage@{t:g}") for t in targets},
        **{f"hierarchical_coverage@{t:g}": mean("class", f"coverage@{t:g}") for t in targets},
        **{f"class_share@{t:g}": mean("class", f"class_share@{t:g}") for t in targets},
    }
    print(
        f"\n{len(classes)} classes of {len(record.makers)} makers; {data[TRAIN].num_rows} train, "
        f"{data[VALIDATION].num_rows} validation, {data[TEST].num_rows} test pictures; {steps} steps; seeds {seeds}"
    )
    print(format_table(["figure (mean over seeds)", "value"], [[key, value] for key, value in summary.items()]))
    save_results(
        args.out,
        NAME,
        machine_info(),
        library_versions("torch", "transformers", "peft", "trl"),
        started,
        steps=steps,
        seeds=seeds,
        classes=len(classes),
        delta=DELTA,
        summary=summary,
        runs=rows,
    )


if __name__ == "__main__":
    main()
