"""Probabilities over every maker, calibration on validation, and "unsure" below the threshold.

| case                                                        | expected                                                     |
|-------------------------------------------------------------|--------------------------------------------------------------|
| every maker's answer scored in one batched pass vs. brute force (one full forward pass per image and maker) | equal to 1e-5, demo makers and makers sharing prefixes, mixed picture sizes |
| the answer pass's logits held one trie node at a time       | the same distribution, still two passes                      |
| all 49 real makers                                          | two passes per batch, never one per maker; all 49 scored     |
| a classified picture                                        | probabilities sum to 1; the maker is the most probable one   |
| threshold and temperature                                   | chosen from validation only: changing test changes neither   |
| target precision 0, -0.1, 1.5, NaN / 1.0                    | rejected as config is read / accepted                        |
| validation with one maker                                   | CalibrationError before the model is loaded                  |
| LoRA run trained on another maker list                      | error naming both sides, before the model is loaded          |
| registered version of other makers (merged_model's input)   | error naming the version, before it loads; same list passes  |
| predictor output below / at / above the threshold           | `unsure` / maker / maker, with the calibrated top three      |
| `classify` line of an unsure answer                         | `unsure` and the top three with their probabilities          |
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from car_maker_pipeline.classify import answer_text
from car_maker_pipeline.evaluation.answer_policy import calibrate
from car_maker_pipeline.evaluation.checkpoint_scores import CheckpointEvaluationError
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError
from car_maker_pipeline.evaluation.scoring.answers import score_answers
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, Prediction
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.recording.baseline import RecordTarget, evaluate_and_record
from car_maker_pipeline.recording.checkpoint_accuracy import check_same_makers
from car_maker_pipeline.serving.predictor import UNSURE, ClassifierCard, answer_table
from car_maker_pipeline.store import CAR_MAKER_DATASET, PipelineStore
from car_maker_pipeline_tests.support.brute_force import answer_log_likelihoods_alone

DEMO_MAKERS = ["AM General", "Aston Martin", "BMW", "Land Rover", "Mercedes-Benz", "Rolls-Royce"]
SHARED_PREFIX_MAKERS = ["Aston Martin", "Aston Martinez", "Land Rover", "Land Rovers", "Land Cruiser", "BMW"]
SIZES = [(128, 96), (64, 48), (200, 90), (96, 128), (40, 40), (160, 120)]


def _pictures(maker_dataset) -> list:
    test = maker_dataset.load()["test"].select(range(len(SIZES)))["image"]
    return [picture.convert("RGB").resize(size) for picture, size in zip(test, SIZES)]


@pytest.mark.parametrize("makers", [DEMO_MAKERS, SHARED_PREFIX_MAKERS], ids=["demo", "shared-prefixes"])
def test_every_maker_is_scored_as_brute_force_would(tiny_model, maker_dataset, makers):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, makers, batch_size=len(SIZES))
    pictures = _pictures(maker_dataset)
    answers = [classifier.answers[m] for m in makers]
    inputs = dict(
        tiny_model.processor(
            images=[[p] for p in pictures],
            text=[classifier.prompt_text] * len(pictures),
            padding=True,
            return_tensors="pt",
        )
    )
    scored = score_answers(tiny_model.model, inputs, makers, answers)
    assert scored.forward_passes == 2  # the prompts, then every maker's answer at once over the trie
    # A logit budget of one trie node at a time: the same distribution, still two passes.
    vocabulary = tiny_model.model.config.text_config.vocab_size
    chunked = score_answers(tiny_model.model, inputs, makers, answers, max_logits=len(pictures) * vocabulary)
    assert chunked.forward_passes == 2
    np.testing.assert_allclose(chunked.log_probs.exp().numpy(), scored.log_probs.exp().numpy(), atol=1e-6)
    for row, picture in enumerate(pictures):
        alone = answer_log_likelihoods_alone(
            tiny_model.model, tiny_model.processor, classifier.prompt_text, picture, answers
        )
        expected = alone.softmax(-1).numpy()
        np.testing.assert_allclose(scored.log_probs[row].exp().numpy(), expected, atol=1e-5)
        assert scored.makers[row] == makers[int(np.argmax(expected))]


def test_classified_pictures_carry_a_distribution_and_its_most_probable_maker(tiny_model, maker_dataset):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=4)
    for prediction in classifier.classify(_pictures(maker_dataset)):
        probabilities = np.exp(prediction.log_probs)
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-9) and len(probabilities) == len(DEMO_MAKERS)
        assert prediction.maker == DEMO_MAKERS[int(np.argmax(probabilities))]
        assert prediction.score == pytest.approx(probabilities.max())


def _predictions(log_probs: np.ndarray, truth: list[int], makers: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "true_maker": [makers[t] for t in truth],
            "predicted_maker": [makers[int(i)] for i in log_probs.argmax(axis=1)],
            "log_probs": [list(row) for row in log_probs],
        }
    )


def _synthetic(seed: int, images: int = 120, makers: int = 4) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, makers, images)
    logits = rng.normal(0, 1, (images, makers))
    logits[np.arange(images), truth] += rng.uniform(0, 4, images)  # right more often when sure
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True), list(truth)


def test_the_threshold_and_temperature_come_from_validation_only():
    makers = ["A", "B", "C", "D"]
    validation, test, other_test = (_predictions(*_synthetic(seed), makers) for seed in (0, 1, 2))
    first = calibrate(validation, test, makers, 0.8).report
    second = calibrate(validation, other_test, makers, 0.8).report
    assert (first.temperature, first.threshold) == (second.temperature, second.threshold)
    assert first.coverage != second.coverage  # measured on each test split
    other_validation = calibrate(_predictions(*_synthetic(3), makers), test, makers, 0.8).report
    assert (other_validation.temperature, other_validation.threshold) != (first.temperature, first.threshold)
    assert first.certified and first.val_coverage > 0
    assert first.answered == round(first.coverage * first.test_images)
    assert first.selective_ci_low <= first.selective_accuracy <= first.selective_ci_high


@pytest.mark.parametrize(
    ("value", "accepted"), [(0, False), (-0.1, False), (1.5, False), (math.nan, False), (1.0, True)]
)
def test_target_precision_outside_zero_one_is_refused_as_config_is_read(value, accepted):
    from car_maker_pipeline.orchestration.assets.baseline import EvaluationConfig
    from car_maker_pipeline.orchestration.assets.evaluation import CheckpointEvaluationConfig

    for config in (EvaluationConfig, CheckpointEvaluationConfig):
        if accepted:
            assert config(target_precision=value).target_precision == value
        else:
            with pytest.raises(ValueError, match="target_precision"):
                config(target_precision=value)
    makers = ["A", "B", "C", "D"]
    frame = _predictions(*_synthetic(0), makers)
    if not accepted:
        with pytest.raises(CalibrationError):
            calibrate(frame, frame, makers, value)


def _store_with_one_validation_maker(record, root):
    """A real store whose current maker dataset is the fixture's, with validation cut down to one maker."""
    from dataclasses import asdict

    dataset = record.load()
    first = dataset["validation"][0]["maker"]
    dataset["validation"] = dataset["validation"].filter(lambda maker: maker == first, input_columns="maker")
    dataset.save_to_disk(str(root / "one_validation_maker"))
    store = PipelineStore(root)
    store.write_manifest(CAR_MAKER_DATASET, {**asdict(record), "path": str(root / "one_validation_maker")})
    return store


def test_a_validation_split_with_one_maker_is_refused_before_model_work(maker_dataset, tmp_path):
    def load_model():
        raise AssertionError("the model was loaded before the validation split was checked")

    with pytest.raises(CalibrationError, match="holds 1 maker"):
        evaluate_and_record(
            _store_with_one_validation_maker(maker_dataset, tmp_path),
            RecordTarget("sqlite:///unused.db", "run"),
            load_model,
            asset="baseline_evaluation",
            model_key="tiny-s",
            stage="baseline",
            prompt=PromptTemplate(),
            batch_size=4,
            split="test",
        )


@pytest.mark.parametrize(
    ("trained_on", "message"),
    [
        (["A", "B"], None),
        (None, None),  # manifests written before the maker list was recorded
        (["A", "B", "C"], "only in training: \\['C'\\]"),
        (["A"], "only in the dataset: \\['B'\\]"),
        (["B", "A"], "same makers, another order"),
    ],
)
def test_a_lora_run_on_another_maker_list_is_named(trained_on, message):
    if message is None:
        check_same_makers(trained_on, ["A", "B"], "tiny-s")
    else:
        with pytest.raises(CheckpointEvaluationError, match=message):
            check_same_makers(trained_on, ["A", "B"], "tiny-s")


CARD = ClassifierCard(["AM General", "BMW", "Land Rover", "Rolls-Royce"], "tiny-s", "rev", temperature=2.0)


@pytest.mark.parametrize(
    ("threshold", "answer"),
    [(None, "BMW"), (0.95, UNSURE), (0.4, "BMW")],
    ids=["no-threshold", "below", "above"],
)
def test_predictor_answers_unsure_below_the_threshold_with_the_calibrated_top_three(threshold, answer):
    log_probs = np.log([0.05, 0.7, 0.2, 0.05])
    card = ClassifierCard(**{**CARD.__dict__, "confidence_threshold": threshold})
    (row,) = answer_table([Prediction("BMW", 0.7, tuple(log_probs))], card).to_dict("records")
    calibrated = np.exp(log_probs / 2.0) / np.exp(log_probs / 2.0).sum()  # temperature 2 flattens them
    assert row["answer"] == answer and row["maker"] == "BMW"
    assert row["level"] == ("unsure" if answer == UNSURE else "maker")
    assert (row["maker_2"], row["maker_3"]) == ("Land Rover", "AM General")  # ties to the first in list order
    assert [row["probability"], row["probability_2"], row["probability_3"]] == pytest.approx(
        [calibrated[1], calibrated[2], calibrated[0]]
    )


def test_an_unsure_answer_prints_the_top_three():
    unsure = {"maker": "BMW", "probability": 0.61, "answer": UNSURE, "maker_2": "Audi", "probability_2": 0.2}
    unsure |= {"maker_3": "Volvo", "probability_3": 0.1}
    assert answer_text(unsure) == "unsure\t(BMW 0.610, Audi 0.200, Volvo 0.100)"
    assert answer_text({**unsure, "answer": "BMW"}) == "BMW\t0.610"


def test_a_blank_picture_still_gets_a_full_distribution(tiny_model):
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, DEMO_MAKERS, batch_size=2)
    (prediction,) = classifier.classify([Image.new("RGB", (128, 96))])
    assert np.isfinite(prediction.log_probs).all()


@pytest.mark.parametrize(
    ("registered_makers", "refused"),
    [(["A", "B"], False), (["B", "A"], True), (["A", "B", "C"], True), (None, False)],
    ids=["same", "reordered", "more", "untagged"],
)
def test_a_registered_model_of_other_makers_is_refused_before_it_loads(registered_makers, refused):
    from types import SimpleNamespace

    from car_maker_pipeline.recording.registry import check_version_makers, maker_list_hash

    tags = {} if registered_makers is None else {"maker_list_hash": maker_list_hash(registered_makers)}
    version = SimpleNamespace(name="car-maker-tiny-s", version="3", tags={**tags, "num_makers": "2"})
    if refused:
        with pytest.raises(ValueError, match="car-maker-tiny-s v3 classifies into .* not car_maker_dataset's 2"):
            check_version_makers(version, ["A", "B"])
    else:
        check_version_makers(version, ["A", "B"])


def test_all_49_real_makers_are_scored_in_two_batched_passes(tiny_model, maker_dataset):
    """The real dataset's maker list: the prompts' pass and the answer trie's, never one per maker."""
    from car_maker_pipeline.data.classes import stanford_cars_class_names
    from car_maker_pipeline.data.makers import makers_for_class_names

    makers = sorted(set(makers_for_class_names(stanford_cars_class_names())))
    assert len(makers) == 49
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, makers, batch_size=len(SIZES))
    pictures = _pictures(maker_dataset)
    predictions = classifier.classify_batch(pictures)
    passes = classifier.stats.summary()["forward_passes_per_image"]
    assert passes == 2
    for prediction in predictions:
        assert len(prediction.log_probs) == 49 and np.exp(prediction.log_probs).sum() == pytest.approx(1.0)


def test_a_greedy_prediction_answers_its_maker_without_runners_up():
    card = ClassifierCard(**{**CARD.__dict__, "confidence_threshold": 0.5})
    (row,) = answer_table([Prediction("Land Rover", 0.8)], card).to_dict("records")
    assert (row["maker"], row["probability"], row["answer"], row["level"]) == ("Land Rover", 0.8, "Land Rover", "maker")
    assert row["maker_2"] is None and math.isnan(row["probability_2"]) and math.isnan(row["probability_3"])
    (low,) = answer_table([Prediction("Land Rover", 0.3)], card).to_dict("records")
    assert low["answer"] == low["level"] == UNSURE


TOP = {"maker": "BMW M3 Coupe 2012", "probability": 0.41, "maker_2": "BMW X5 SUV 2007", "probability_2": 0.3}
TOP |= {"maker_3": "Audi S4 Sedan 2012", "probability_3": 0.1}
RUNNERS = "(BMW M3 Coupe 2012 0.410, BMW X5 SUV 2007 0.300, Audi S4 Sedan 2012 0.100)"


# | answer             | level  | printed line                                  |
CLASS_TASK_LINES = [
    ("BMW M3 Coupe 2012", "class", "BMW M3 Coupe 2012\t0.410\tclass level"),
    ("BMW", "maker", f"BMW\tmaker level\t{RUNNERS}"),
    (UNSURE, "unsure", f"unsure\t{RUNNERS}"),
]


@pytest.mark.parametrize(("answer", "level", "line"), CLASS_TASK_LINES)
def test_a_class_task_answer_prints_its_level(answer, level, line):
    assert answer_text({**TOP, "answer": answer, "level": level}) == line
