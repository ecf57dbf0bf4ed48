"""bench_evaluator's input-pipeline comparison: the evaluator preparing batches in 0, 1 or 2 threads ahead of the model.

Each side runs `evaluate_split` over the stored split (bytes read, decoded, made RGB, LFM2-VL's
processor, then the model), as `baseline_evaluation` and `checkpoint_accuracy` run it, so decoding
and preparation are timed; 0 workers is the evaluator before the change (everything in one thread,
one step after another). Sides alternate, order reversed every repetition; the ratio is the median
over repetitions of (images/s with N workers) / (images/s with 0).
"""

from __future__ import annotations

import time

from _common import format_table, median

WORKERS = (0, 1, 2)


def compare_workers(model, processor, makers: list[str], split, repeats: int, batch_size: int) -> dict:
    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split

    classifiers = {
        workers: MakerClassifier(model, processor, makers, batch_size=batch_size, workers=workers)
        for workers in WORKERS
    }
    reference = evaluate_split(classifiers[0], split).predictions  # untimed: caches warm
    seconds: dict[int, list[float]] = {workers: [] for workers in WORKERS}
    different = 0
    for repetition in range(repeats):
        for workers in WORKERS if repetition % 2 == 0 else reversed(WORKERS):
            started = time.perf_counter()
            run = evaluate_split(classifiers[workers], split)
            seconds[workers].append(time.perf_counter() - started)
            different += int((run.predictions["predicted_maker"] != reference["predicted_maker"]).sum())
    images = split.num_rows
    return {
        "images": images,
        "prefetch": classifiers[1].prefetch,
        "images_per_second": {workers: images / median(values) for workers, values in seconds.items()},
        "ratio_vs_0_workers": {
            workers: median([base / mine for base, mine in zip(seconds[0], seconds[workers])]) for workers in WORKERS
        },
        "seconds": seconds,
        "different_answers": different,
    }


def print_workers_table(sizes: str, result: dict) -> None:
    print(f"\ninput pipeline, {sizes} sizes, {result['images']} stored test pictures (prefetch {result['prefetch']}):")
    print(
        format_table(
            ["prepare workers", "images/s", "ratio vs 0 workers"],
            [[w, result["images_per_second"][w], result["ratio_vs_0_workers"][w]] for w in WORKERS],
        )
    )
    print(f"answers different from 0 workers: {result['different_answers']}")


def compare_draft(model, processor, makers: list[str], split, repeats: int, batch_size: int) -> dict:
    """Full decode against draft decode (`draft_decode`): agreement of every maker's probability and
    of the answers, and images/s (median over repetitions of draft / full)."""
    import numpy as np

    from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split

    sides = {
        draft: MakerClassifier(model, processor, makers, batch_size=batch_size, workers=0, draft_decode=draft)
        for draft in (False, True)
    }
    runs = {draft: evaluate_split(classifier, split).predictions for draft, classifier in sides.items()}
    probabilities = {draft: np.exp(np.array(run["log_probs"].tolist())) for draft, run in runs.items()}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for repetition in range(repeats):
        for draft in (False, True) if repetition % 2 == 0 else (True, False):
            started = time.perf_counter()
            evaluate_split(sides[draft], split)
            seconds[draft].append(time.perf_counter() - started)
    return {
        "images": split.num_rows,
        "max_probability_difference": float(np.abs(probabilities[True] - probabilities[False]).max()),
        "answers_changed": int((runs[True]["predicted_maker"] != runs[False]["predicted_maker"]).sum()),
        "images_per_second": {
            "full": split.num_rows / median(seconds[False]),
            "draft": split.num_rows / median(seconds[True]),
        },
        "ratio_draft_vs_full": median([full / draft for full, draft in zip(seconds[False], seconds[True])]),
    }
