"""Benchmark: what scoring the class task's 196 answers costs against the maker task's 49, on the same pictures.

    python bench/bench_class_scoring.py            # 64 demo and 32 realistic pictures, batches of 16, 3 repetitions
    python bench/bench_class_scoring.py --small    # 32 demo and 8 realistic pictures, 2 repetitions

What is measured
----------------
Model: tiny-s (`build_tiny_model`, random weights) on the CPU, one torch thread. Pictures: the test split of
a demo source (6 makers) at two size mixes, `demo` (128x96) and `realistic` (Stanford Cars' photo sizes,
offline/population.py), decoded once before any timing; the processor runs inside the timing, as in
evaluation. Answers: the 49 real makers (the maker
task's prompt, which lists them) and the 196 real class names (the class task's prompt, which lists their
49 makers instead), so both prompts are about as long and the answer sets are Stanford Cars' own.

Four variants, interleaved within each repetition (medians reported):

- maker:       every maker's answer scored as `score_answers` does: the prompts' pass, then one pass over
               the answers' trie that shares the prompts' cache (`answer_tree.py`);
- maker_rows:  the scoring before the trie pass (`_per_answer_scoring.py`): a row per answer over a copy of
               the prompt's cache, in passes within the CPU's 16 MiB copy budget;
- class:       the 196 classes, as the maker task;
- class_rows:  the 196 classes in rows.

Reported: seconds per repetition, forward passes per picture, answer tokens per picture (the sum of the
answers' lengths) against the tokens each method feeds per picture (the trie's nodes; in rows, every
answer's tokens but the last, padded), and the ratios class/maker (goal of the class task: at most 2x the
maker task's evaluation time), each the median of the ratios within a repetition. The largest difference
of any answer's log-probability between the trie pass and the rows is reported as `max_log_prob_diff`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _per_answer_scoring as per_answer  # noqa: E402
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

from car_maker_pipeline.data.classes import stanford_cars_class_names  # noqa: E402
from car_maker_pipeline.data.makers import makers_for_class_names  # noqa: E402
from car_maker_pipeline.data.tasks import CLASS, MAKER  # noqa: E402
from car_maker_pipeline.evaluation.scoring import answers as scoring  # noqa: E402
from car_maker_pipeline.evaluation.scoring import classifier as classifier_module  # noqa: E402
from car_maker_pipeline.evaluation.scoring.answer_tree import AnswerTree  # noqa: E402
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier  # noqa: E402
from car_maker_pipeline.models.loading import load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402

NAME = "bench_class_scoring"
BATCH_SIZE = 16


def _tokens_fed(classifier: MakerClassifier, rows: bool) -> tuple[float, float]:
    """(answer tokens per picture, tokens the method feeds per picture)."""
    answers = [classifier.answers[answer] for answer in classifier.makers]
    if rows:
        widths = [len(ids) - 1 for ids in answers]
        batches = per_answer._chunks(widths, 10**9, 10**9)  # padding only; the copy budget splits, never pads
        fed = sum(len(chunk) * max(max(widths[a] for a in chunk), 1) for chunk in batches)
    else:
        fed = len(AnswerTree.build(tuple(tuple(ids) for ids in answers), 1).tokens)
    return float(sum(len(ids) for ids in answers)), float(fed)


def run_variant(loaded, task, answers, rows: bool, pictures) -> dict:
    scoring_method = per_answer.score_answers_in_rows if rows else scoring.score_answers
    classifier_module.score_answers = scoring_method
    try:
        classifier = MakerClassifier(
            loaded.model, loaded.processor, answers, prompt=task.prompt(answers), batch_size=BATCH_SIZE, workers=0
        )
        classifier.classify(pictures[:BATCH_SIZE])  # warm-up, untimed
        classifier.stats = type(classifier.stats)()
        started = time.perf_counter()
        predictions = classifier.classify(pictures)
        seconds = time.perf_counter() - started
    finally:
        classifier_module.score_answers = scoring.score_answers
    tokens, fed = _tokens_fed(classifier, rows)
    return {
        "seconds": seconds,
        "forward_passes_per_image": classifier.stats.summary()["forward_passes_per_image"],
        "answer_tokens_per_image": tokens,
        "tokens_fed_per_image": fed,
        "log_probs": [p.log_probs for p in predictions],
    }


def measure(loaded, makers: list[str], classes: list[str], pictures: list, repetitions: int) -> dict:
    """The four variants on `pictures`, interleaved; medians, ratios and the trie-vs-rows difference."""
    variants = {
        "maker": (MAKER, makers, False),
        "maker_rows": (MAKER, makers, True),
        "class": (CLASS, classes, False),
        "class_rows": (CLASS, classes, True),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repetition in range(repetitions):
        names = list(variants) if repetition % 2 == 0 else list(reversed(variants))
        for name in names:
            runs[name].append(run_variant(loaded, *variants[name], pictures))

    def ratio(numerator: str, denominator: str) -> float:
        """The median over repetitions of the ratio within each repetition (the machine is shared)."""
        return statistics.median(a["seconds"] / b["seconds"] for a, b in zip(runs[numerator], runs[denominator]))

    return {
        "pictures": len(pictures),
        "variants": {
            name: {
                "seconds": statistics.median(run["seconds"] for run in rows),
                **{key: rows[0][key] for key in rows[0] if key not in ("seconds", "log_probs")},
            }
            for name, rows in runs.items()
        },
        "ratios": {
            "class_over_maker": ratio("class", "maker"),
            "class_over_maker_rows": ratio("class", "maker_rows"),
            "class_rows_over_maker_rows": ratio("class_rows", "maker_rows"),
            "maker_speedup": ratio("maker_rows", "maker"),
            "class_speedup": ratio("class_rows", "class"),
        },
        "max_log_prob_diff": max(
            abs(a - b)
            for name in ("maker", "class")
            for one, other in zip(runs[name][0]["log_probs"], runs[f"{name}_rows"][0]["log_probs"])
            for a, b in zip(one, other)
        ),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="32 pictures (8 realistic), 2 repetitions")
    parser.add_argument("--sizes", nargs="+", choices=("demo", "realistic"), default=["demo", "realistic"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    quiet_libraries()
    torch.set_num_threads(1)
    repetitions = 2 if args.small else 3
    model_dir = args.work / "tiny-s-seed0"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, "tiny-s")
    loaded = load_model_and_processor(str(model_dir), device="cpu")
    classes = list(stanford_cars_class_names())
    makers = sorted(set(makers_for_class_names(classes)))
    results = {}
    for sizes in args.sizes:
        wanted = {"demo": 32 if args.small else 64, "realistic": 8 if args.small else 32}[sizes]
        test = cached_maker_dataset(args.work, "class-scoring", 10, 12, image_sizes=sizes).load()["test"]
        pictures = [test[i]["image"].convert("RGB") for i in range(min(wanted, test.num_rows))]
        results[sizes] = measure(loaded, makers, classes, pictures, repetitions)
        print(
            f"\n{sizes} sizes: {len(pictures)} pictures, batches of {BATCH_SIZE}, median of {repetitions} (tiny-s, CPU)"
        )
        headers = ["variant", "s", "passes/picture", "answer tokens/picture", "tokens fed/picture"]
        rows = [
            [name, r["seconds"], r["forward_passes_per_image"], r["answer_tokens_per_image"], r["tokens_fed_per_image"]]
            for name, r in results[sizes]["variants"].items()
        ]
        print(format_table(headers, rows))
        print(format_table(["ratio", "value"], list(results[sizes]["ratios"].items())))
        print(f"max log-probability difference, trie pass vs rows: {results[sizes]['max_log_prob_diff']:.2e}")
    save_results(
        args.out,
        NAME,
        machine_info(),
        library_versions("torch", "transformers"),
        started,
        repetitions=repetitions,
        results=results,
    )


if __name__ == "__main__":
    main()
