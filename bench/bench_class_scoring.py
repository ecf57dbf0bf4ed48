"""Benchmark: what scoring the class task's 196 answers costs against the maker task's 49, on the same pictures.

    python bench/bench_class_scoring.py            # 64 demo pictures, batches of 16, 3 repetitions
    python bench/bench_class_scoring.py --small    # 32 pictures, 2 repetitions

What is measured
----------------
Model: tiny-s (`build_tiny_model`, random weights) on the CPU, one torch thread. Pictures: the test split of
a demo source (6 makers, 128x96), decoded once before any timing. Answers: the 49 real makers (the maker
task's prompt, which lists them) and the 196 real class names (the class task's prompt, which lists their
49 makers instead), so both prompts are about as long and the answer sets are Stanford Cars' own.

Four variants, interleaved within each repetition (medians reported):

- maker:          every maker's answer scored as `score_answers` does on a CPU: answers sorted by length,
                  in passes within the CPU's copy budget (`answers.CPU_SCORING_CACHE_BYTES`);
- maker_before:   all 49 answers in one pass, padded to the longest: how the evaluator scored before
                  (the accelerator budget, `PASS_COST_POSITIONS` lifted);
- class:          the 196 classes, as the maker task;
- class_before:   the 196 classes in one pass.

Reported: seconds per repetition, forward passes per picture, answer tokens per picture (each answer's
tokens, what the scoring reads; the first comes from the prompt's pass) against the answer positions the
passes feed (every token but the first, padding included), and the ratios class/maker (goal of the class
task: at most 2x the maker task's evaluation time), each the median of the ratios within a repetition. The largest difference of
any answer's log-probability between today's and the one-pass scoring is reported as `max_log_prob_diff`.
"""

from __future__ import annotations

import argparse
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

from car_maker_pipeline.data.classes import stanford_cars_class_names  # noqa: E402
from car_maker_pipeline.data.makers import makers_for_class_names  # noqa: E402
from car_maker_pipeline.data.tasks import CLASS, MAKER  # noqa: E402
from car_maker_pipeline.evaluation.scoring import answers as scoring  # noqa: E402
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier  # noqa: E402
from car_maker_pipeline.models.loading import load_model_and_processor  # noqa: E402
from car_maker_pipeline.offline.tiny_models import build_tiny_model  # noqa: E402

NAME = "bench_class_scoring"
BATCH_SIZE = 16


def _answer_positions(classifier: MakerClassifier, row_bytes: int, vocabulary: int, budget: int) -> tuple[float, float]:
    """(answer tokens per picture, positions the passes compute per picture) for a batch of BATCH_SIZE pictures,
    as `score_answers` splits them (`row_bytes`: one picture's prompt cache)."""
    widths = [len(classifier.answers[answer]) - 1 for answer in classifier.makers]
    chunks = scoring.answer_chunks(
        widths, scoring.MAX_SCORING_LOGITS // (BATCH_SIZE * vocabulary), budget // (BATCH_SIZE * row_bytes)
    )
    computed = sum(len(chunk) * max(max(widths[a] for a in chunk), 1) for chunk in chunks)
    return float(sum(len(classifier.answers[a]) for a in classifier.makers)), float(computed)


def run_variant(loaded, task, answers, cache_budget: int, pass_cost: float, pictures) -> dict:
    scoring.CPU_SCORING_CACHE_BYTES, scoring.PASS_COST_POSITIONS = cache_budget, pass_cost
    classifier = MakerClassifier(
        loaded.model, loaded.processor, answers, prompt=task.prompt(answers), batch_size=BATCH_SIZE, workers=0
    )
    classifier.classify(pictures[:BATCH_SIZE])  # warm-up, untimed
    classifier.stats = type(classifier.stats)()
    started = time.perf_counter()
    predictions = classifier.classify(pictures)
    seconds = time.perf_counter() - started
    _, cache = scoring._forward(loaded.model, None, **_inputs(classifier, pictures[:BATCH_SIZE]))
    row_bytes = scoring.cache_bytes_per_row(cache, BATCH_SIZE)
    vocabulary = loaded.model.config.text_config.vocab_size
    tokens, computed = _answer_positions(classifier, row_bytes, vocabulary, cache_budget)
    return {
        "seconds": seconds,
        "forward_passes_per_image": classifier.stats.summary()["forward_passes_per_image"],
        "answer_tokens_per_image": tokens,
        "answer_positions_fed_per_image": computed,
        "log_probs": [p.log_probs for p in predictions],
    }


def _inputs(classifier, pictures):
    return dict(
        classifier.processor(
            images=[[p] for p in pictures],
            text=[classifier.prompt_text] * len(pictures),
            padding=True,
            return_tensors="pt",
        )
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="32 pictures, 2 repetitions")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    quiet_libraries()
    torch.set_num_threads(1)
    pictures_wanted, repetitions = (32, 2) if args.small else (64, 3)
    record = cached_maker_dataset(args.work, "class-scoring", 10, 12)
    test = record.load()["test"]
    pictures = [test[i]["image"].convert("RGB") for i in range(min(pictures_wanted, test.num_rows))]
    model_dir = args.work / "tiny-s-seed0"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, "tiny-s")
    loaded = load_model_and_processor(str(model_dir), device="cpu")
    classes = list(stanford_cars_class_names())
    makers = sorted(set(makers_for_class_names(classes)))
    budget, pass_cost = scoring.CPU_SCORING_CACHE_BYTES, scoring.PASS_COST_POSITIONS
    before = (scoring.MAX_SCORING_CACHE_BYTES, float("inf"))
    variants = {
        "maker": (MAKER, makers, budget, pass_cost),
        "maker_before": (MAKER, makers, *before),
        "class": (CLASS, classes, budget, pass_cost),
        "class_before": (CLASS, classes, *before),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repetition in range(repetitions):
        names = list(variants) if repetition % 2 == 0 else list(reversed(variants))
        for name in names:
            runs[name].append(run_variant(loaded, *variants[name], pictures))
    scoring.CPU_SCORING_CACHE_BYTES, scoring.PASS_COST_POSITIONS = budget, pass_cost
    results = {
        name: {
            "seconds": statistics.median(run["seconds"] for run in rows),
            **{key: rows[0][key] for key in rows[0] if key not in ("seconds", "log_probs")},
        }
        for name, rows in runs.items()
    }
    differences = [
        max(
            abs(a - b)
            for one, other in zip(runs[name][0]["log_probs"], runs[f"{name}_before"][0]["log_probs"])
            for a, b in zip(one, other)
        )
        for name in ("maker", "class")
    ]

    def ratio(numerator: str, denominator: str) -> float:
        """The median over repetitions of the ratio within each repetition (the machine is shared)."""
        return statistics.median(a["seconds"] / b["seconds"] for a, b in zip(runs[numerator], runs[denominator]))

    ratios = {
        "class_over_maker": ratio("class", "maker"),
        "class_over_maker_before": ratio("class", "maker_before"),
        "maker_speedup": ratio("maker_before", "maker"),
        "class_speedup": ratio("class_before", "class"),
    }
    headers = ["variant", "s", "passes/picture", "answer tokens/picture", "answer positions fed/picture"]
    print(f"\n{len(pictures)} pictures, batches of {BATCH_SIZE}, median of {repetitions} repetitions (tiny-s, CPU)")
    print(
        format_table(
            headers,
            [
                [
                    name,
                    r["seconds"],
                    r["forward_passes_per_image"],
                    r["answer_tokens_per_image"],
                    r["answer_positions_fed_per_image"],
                ]
                for name, r in results.items()
            ],
        )
    )
    print(format_table(["ratio", "value"], [[name, value] for name, value in ratios.items()]))
    print(f"max log-probability difference, today vs before: {max(differences):.2e}")
    save_results(
        args.out,
        NAME,
        machine_info(),
        library_versions("torch", "transformers"),
        started,
        pictures=len(pictures),
        repetitions=repetitions,
        cpu_scoring_cache_bytes=budget,
        results=results,
        ratios=ratios,
        max_log_prob_diff=max(differences),
    )


if __name__ == "__main__":
    main()
