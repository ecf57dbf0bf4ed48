"""The methods `bench_evaluator.py` compares, timed over the same images, and the tables it prints.

See `bench_evaluator.py`'s docstring for what each method is and how the figures are computed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import format_table, median

from car_maker_pipeline.evaluation.scoring.answers import Decoded, decode
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, ThroughputStats
from car_maker_pipeline.evaluation.scoring.reference import generate_decode
from car_maker_pipeline.model_inputs.images import model_ready
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.models.loading import load_model_and_processor

MAX_NEW_TOKENS = 64  # the tutorial's free-text answer length


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------


def load_base(model_dir: Path):
    loaded = load_model_and_processor(str(model_dir), device="cpu", dtype="float32")
    return loaded.model, loaded.processor


def load_with_adapter(model_dir: Path, adapter: Path):
    from peft import PeftModel

    model, processor = load_base(model_dir)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, processor


# --------------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------------


def run_ours(classifier: MakerClassifier, images: list) -> list[str]:
    return [p.maker for p in classifier.classify(images)]


class PreviousEvaluator:
    """The evaluator before this change: batches in input order, `generate` with the trie mask.

    It runs the classifier's own batch path (processor, dtype, throughput stats) with the earlier
    decoding swapped in, so only sorting and forced-token skipping differ from ours.
    """

    def __init__(self, classifier: MakerClassifier):
        self.classifier = classifier

    @property
    def stats(self) -> ThroughputStats:
        return self.classifier.stats

    @stats.setter
    def stats(self, value: ThroughputStats) -> None:
        self.classifier.stats = value

    def decode(self, model, inputs, trie, pad_id):
        return generate_decode(model, inputs, trie, pad_id, self.classifier.end_id)

    def run(self, images: list) -> list[str]:
        c, answers = self.classifier, []
        for start in range(0, len(images), c.batch_size):
            batch = [model_ready(image) for image in images[start : start + c.batch_size]]
            answers.extend(p.maker for p in c._run_batch(batch, decoder=self.decode))
        return answers


@torch.inference_mode()
def prompt_pass_only(model, inputs, trie, pad_id) -> Decoded:
    """The prompt's forward pass alone, as every decoder starts (no answer chosen: a placeholder maker)."""
    mask = inputs["attention_mask"]
    model(**inputs, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    placeholder = next(iter(trie.leaves.values()))
    return Decoded([placeholder] * mask.shape[0], [0.0] * mask.shape[0], 1)


class NaiveFreeText:
    """The tutorial's loop: one image, free-text greedy generation, string comparison afterwards."""

    def __init__(self, model, processor, makers: list[str], prompt: PromptTemplate | None = None):
        self.model, self.processor, self.makers = model, processor, list(makers)
        prompt = prompt or PromptTemplate()
        self.text = processor.apply_chat_template(
            prompt.messages(self.makers), add_generation_prompt=True, tokenize=False
        )
        self.tokenizer = processor.tokenizer
        self.generated_tokens: list[int] = []

    @torch.inference_mode()
    def answer(self, image) -> str:
        inputs = self.processor(images=[[image]], text=[self.text], return_tensors="pt")
        out = self.model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        new = out[0, inputs["input_ids"].shape[1] :]
        self.generated_tokens.append(int(new.numel()))
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def run(self, images: list) -> list[str]:
        self.generated_tokens = []
        return [self.answer(image) for image in images]


def score(answers: list[str], truth: list[str], makers: list[str]) -> dict:
    valid = {m.lower() for m in makers}
    cleaned = [a.strip().lower() for a in answers]
    correct = sum(a == t.lower() for a, t in zip(cleaned, truth))
    invalid = sum(a not in valid for a in cleaned)
    return {"accuracy": correct / len(truth), "correct": correct, "invalid": invalid, "n": len(truth)}


METHODS = ("ours", "greedy", "before", "prompt", "naive")


def compare(
    label: str, model, processor, makers: list[str], images: list, truth: list[str], repeats: int, batch_size: int
) -> dict:
    """Warm up all three, then time them `repeats` times in rotating order; accuracy from the last run."""
    model.eval()
    classifier = MakerClassifier(model, processor, makers, batch_size=batch_size)
    greedy = MakerClassifier(model, processor, makers, batch_size=batch_size, decoder=decode)
    before = PreviousEvaluator(MakerClassifier(model, processor, makers, batch_size=batch_size))
    prompt_only = MakerClassifier(model, processor, makers, batch_size=batch_size, decoder=prompt_pass_only)
    naive = NaiveFreeText(model, processor, makers)
    warm = images[: min(batch_size, 4)]
    classifier.classify_batch(warm)
    greedy.classify_batch(warm)
    prompt_only.classify_batch(warm)
    before.run(warm)
    naive.run(warm[:1])
    runners = {
        "ours": lambda: run_ours(classifier, images),
        "greedy": lambda: run_ours(greedy, images),
        "prompt": lambda: run_ours(prompt_only, images),
        "before": lambda: before.run(images),
        "naive": lambda: naive.run(images),
    }

    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    answers: dict[str, list[str]] = {}
    tokens: list[float] = []
    for rep in range(repeats):
        for name in METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]:
            if name == "ours":
                classifier.stats = ThroughputStats()
            elif name == "greedy":
                greedy.stats = ThroughputStats()
            elif name == "before":
                before.stats = ThroughputStats()
            t0 = time.perf_counter()
            answers[name] = runners[name]()
            seconds[name].append(time.perf_counter() - t0)
            if name == "naive":
                tokens.append(sum(naive.generated_tokens) / len(images))
            print(
                f"  [{label}] rep {rep + 1}/{repeats} {name:5s} {seconds[name][-1]:7.2f}s "
                f"{len(images) / seconds[name][-1]:7.1f} images/s",
                flush=True,
            )
    n = len(images)
    ips = {k: [n / s for s in v] for k, v in seconds.items()}
    ratios = [o / f for o, f in zip(ips["ours"], ips["naive"])]
    ratios_before = [o / b for o, b in zip(ips["ours"], ips["before"])]
    ratios_greedy = [o / g for o, g in zip(ips["ours"], ips["greedy"])]
    ceiling = [c / f for c, f in zip(ips["prompt"], ips["naive"])]
    result = {
        "ratio_prompt_pass_over_naive": ceiling,
        "median_ceiling_over_naive": median(ceiling),
        "ratio_ours_over_greedy": ratios_greedy,
        "median_ratio_greedy": median(ratios_greedy),
        "same_answer_greedy": sum(o == g for o, g in zip(answers["ours"], answers["greedy"])) / len(images),
        "greedy": score(answers["greedy"], truth, makers),
        "ratio_ours_over_before": ratios_before,
        "median_ratio_before": median(ratios_before),
        "throughput": {
            "ours": classifier.stats.summary(),
            "greedy": greedy.stats.summary(),
            "before": before.stats.summary(),
        },
        "same_answer_before": sum(o == b for o, b in zip(answers["ours"], answers["before"])) / n,
        "model": label,
        "images": n,
        "seconds": seconds,
        "images_per_second": ips,
        "median_images_per_second": {k: median(v) for k, v in ips.items()},
        "ratio_ours_over_naive": ratios,
        "median_ratio": median(ratios),
        "ours": score(answers["ours"], truth, makers),
        "naive": score(answers["naive"], truth, makers),
        "same_answer_fraction": sum(
            o.strip().lower() == f.strip().lower() for o, f in zip(answers["ours"], answers["naive"])
        )
        / n,
        "naive_mean_generated_tokens": median(tokens),
        "naive_answer_examples": sorted({a.strip() for a in answers["naive"]}, key=len)[:8],
        "ours_predicted_makers": {m: answers["ours"].count(m) for m in makers},
    }
    return result


def print_tables(results: list[dict], n_images: int, repeats: int) -> None:
    """The three comparison tables: ours against the tutorial loop, greedy decoding and the evaluator before."""
    rows = [
        [
            r["model"],
            r["median_images_per_second"]["ours"],
            r["median_images_per_second"]["naive"],
            r["median_ratio"],
            r["median_ceiling_over_naive"],
            f"{r['ours']['accuracy']:.1%}",
            f"{r['naive']['accuracy']:.1%}",
            r["ours"]["invalid"],
            r["naive"]["invalid"],
            f"{r['same_answer_fraction']:.1%}",
            r["naive_mean_generated_tokens"],
        ]
        for r in results
    ]
    print(f"\n{n_images} images, {repeats} repetitions, medians (ratio = median of per-repetition ours/naive):")
    print(
        format_table(
            [
                "model",
                "ours images/s",
                "naive images/s",
                "ratio ours/naive",
                "ceiling: prompt pass/naive",
                "ours acc",
                "naive acc",
                "ours invalid",
                "naive invalid",
                "same answer",
                "naive tokens/answer",
            ],
            rows,
        )
    )
    for r in results:
        print(f"  {r['model']}: naive answers e.g. {r['naive_answer_examples'][:3]}")
    print("\nours (every maker's answer scored) vs. greedy trie decoding (one path, no distribution):")
    print(
        format_table(
            ["model", "ours images/s", "greedy images/s", "ratio ours/greedy", "same answer", "ours acc",
             "greedy acc", "passes/image ours", "passes/image greedy"],
            [
                [
                    r["model"],
                    r["median_images_per_second"]["ours"],
                    r["median_images_per_second"]["greedy"],
                    r["median_ratio_greedy"],
                    f"{r['same_answer_greedy']:.1%}",
                    f"{r['ours']['accuracy']:.1%}",
                    f"{r['greedy']['accuracy']:.1%}",
                    r["throughput"]["ours"]["forward_passes_per_image"],
                    r["throughput"]["greedy"]["forward_passes_per_image"],
                ]
                for r in results
            ],
        )
    )  # fmt: skip
    print("\nours vs. the evaluator before forced-token skipping and sorted batches:")
    print(
        format_table(
            ["model", "ours images/s", "before images/s", "ratio ours/before", "same answer", "padded/real ours",
             "padded/real before", "passes/image ours", "passes/image before", "image tokens mean", "p95"],
            [
                [
                    r["model"],
                    r["median_images_per_second"]["ours"],
                    r["median_images_per_second"]["before"],
                    r["median_ratio_before"],
                    f"{r['same_answer_before']:.1%}",
                    r["throughput"]["ours"]["padded_to_real_tokens"],
                    r["throughput"]["before"]["padded_to_real_tokens"],
                    r["throughput"]["ours"]["forward_passes_per_image"],
                    r["throughput"]["before"]["forward_passes_per_image"],
                    r["throughput"]["ours"]["image_tokens_mean"],
                    r["throughput"]["ours"]["image_tokens_p95"],
                ]
                for r in results
            ],
        )
    )  # fmt: skip
