"""The class task (make, model and year): what differs from the maker task (data/tasks.py), and its assessment
on the tiny model's real scores (evaluation/class_task.py).

| call                                             | expected                                                        |
|--------------------------------------------------|-----------------------------------------------------------------|
| get_task("maker"), get_task("class")             | columns maker / source_class; predictions true_maker / true_class |
| get_task("model")                                | TaskError listing both tasks                                    |
| CLASS.prompt(classes)                            | lists the classes' makers, once each, not the classes            |
| MAKER.prompt(makers)                             | today's prompt: lists the makers                                |
| CLASS.answers(makers, the rows' classes)         | the classes, sorted, each once; none: TaskError                  |
| check_same_task("maker", "class", "tiny-s")      | TaskError naming both tasks and the model                       |
| check_known_answers(CLASS, ["BMW X9 2030"], ...) | TaskError naming the unknown class and the dataset's classes     |
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import top_k_accuracy_score

from car_maker_pipeline.data.dataset_spec import TEST, VALIDATION, column
from car_maker_pipeline.data.tasks import CLASS, MAKER, TaskError, check_known_answers, check_same_task, get_task
from car_maker_pipeline.evaluation.class_task import (
    CURVE_CHART,
    LEVELS_FILE,
    PER_CLASS_FILE,
    assess_class_answers,
    write_class_report,
)
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError, softmax
from car_maker_pipeline.evaluation.scoring.classifier import MakerClassifier, evaluate_split
from car_maker_pipeline.model_inputs.prompt import PromptTemplate
from car_maker_pipeline.serving.predictor import UNSURE

CLASSES = ["BMW M3 Coupe 2012", "BMW X6 SUV 2012", "Rolls-Royce Ghost Sedan 2012", "AM General Hummer SUV 2000"]


def test_the_two_tasks_read_their_own_column_and_name_their_predictions():
    assert (get_task("maker").label_column, get_task("class").label_column) == ("maker", "source_class")
    assert (MAKER.true_column, CLASS.predicted_column) == ("true_maker", "predicted_class")
    with pytest.raises(TaskError, match=r"unknown task 'model'; the tasks are \['class', 'maker'\]"):
        get_task("model")


def test_the_class_prompt_lists_the_makers_of_its_classes_not_the_classes():
    text = CLASS.prompt(CLASSES).user_text(CLASSES)
    assert text.endswith("one of: AM General, BMW, Rolls-Royce") and "X6" not in text and "Ghost" not in text
    assert MAKER.prompt(["BMW", "Audi"]).user_text(["BMW", "Audi"]) == PromptTemplate().user_text(["BMW", "Audi"])
    assert CLASS.prompt(CLASSES).fingerprint(CLASSES) != CLASS.prompt(CLASSES[:2]).fingerprint(CLASSES[:2])


def test_class_answers_are_the_classes_the_dataset_has():
    assert CLASS.answers(["BMW"], ["BMW X6 SUV 2012", "BMW M3 Coupe 2012", "BMW X6 SUV 2012", ""]) == [
        "BMW M3 Coupe 2012",
        "BMW X6 SUV 2012",
    ]
    assert MAKER.answers(["BMW", "Audi"], ["BMW X6 SUV 2012"]) == ["BMW", "Audi"]
    with pytest.raises(TaskError, match="no class names"):
        CLASS.answers(["BMW"], ["", ""])


def test_mismatches_name_both_sides():
    with pytest.raises(TaskError, match=r"tiny-s answers the 'maker' task but the 'class' task was asked for"):
        check_same_task("maker", "class", "tiny-s")
    check_same_task("class", "class", "tiny-s")
    with pytest.raises(TaskError, match=r"\['BMW X9 2030'\].*BMW M3 Coupe 2012"):
        check_known_answers(CLASS, ["BMW X9 2030", "BMW M3 Coupe 2012"], CLASSES, "the override")
    check_known_answers(CLASS, CLASSES[:1], CLASSES, "the override")


@pytest.fixture(scope="module")
def class_runs(tiny_model, maker_dataset):
    data = maker_dataset.load()
    classes = CLASS.answers(
        maker_dataset.makers, [name for part in data.values() for name in column(part, "source_class")]
    )
    classifier = MakerClassifier(
        tiny_model.model, tiny_model.processor, classes, prompt=CLASS.prompt(classes), batch_size=8, workers=0
    )
    runs = {split: evaluate_split(classifier, data[split], task=CLASS) for split in (VALIDATION, TEST)}
    return classes, runs, data


def test_class_predictions_score_every_class_of_the_dataset(class_runs):
    classes, runs, data = class_runs
    test = runs[TEST].predictions
    assert test[CLASS.true_column].tolist() == column(data[TEST], "source_class")
    assert set(test[CLASS.predicted_column]) <= set(classes)
    log_probs = np.stack(test["log_probs"])
    assert log_probs.shape == (data[TEST].num_rows, len(classes))
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, atol=1e-6)
    assert [classes[i] for i in log_probs.argmax(axis=1)] == test[CLASS.predicted_column].tolist()


def test_the_assessment_agrees_with_scikit_learn_and_its_levels_add_up(class_runs, tmp_path):
    classes, runs, _ = class_runs
    assessment = assess_class_answers(runs[VALIDATION].predictions, runs[TEST].predictions, classes, 0.9, delta=0.1)
    report = assessment.report
    test = runs[TEST].predictions
    probabilities = softmax(np.stack(test["log_probs"]))
    truth = test[CLASS.true_column].map({name: i for i, name in enumerate(classes)}).to_numpy()
    labels = list(range(len(classes)))
    assert report.top1_accuracy == pytest.approx(np.mean(test[CLASS.true_column] == test[CLASS.predicted_column]))
    assert report.top5_accuracy == pytest.approx(top_k_accuracy_score(truth, probabilities, k=5, labels=labels))
    # the random tiny model gives some true classes p < 1e-12, where log_loss clips (eps) and scikit-learn
    # does not: compare the per-image losses above the clip, and the mean with the clip applied by hand
    kept = probabilities[np.arange(len(truth)), truth] > 1e-12
    assert report.log_loss == pytest.approx(
        -np.log(np.clip(probabilities[np.arange(len(truth)), truth], 1e-12, 1)).mean()
    )
    if kept.sum() > 1:
        assert -np.log(probabilities[kept, truth[kept]]).mean() == pytest.approx(
            sklearn_log_loss(truth[kept], probabilities[kept], labels=labels)
        )
    assert report.implied_maker_accuracy >= report.top1_accuracy
    assert report.right_maker_wrong_model == pytest.approx(report.implied_maker_accuracy - report.top1_accuracy)
    assert report.class_share + report.maker_share + report.unsure_share == pytest.approx(1.0)
    assert report.test_images == len(test) and report.threshold_images + report.temperature_images > 0
    assert "precision" in report.statement

    files = write_class_report(assessment, tmp_path / "class_task", "tiny-s")
    assert json.dumps(files.report().to_json()) == json.dumps(report.to_json())  # NaN (nothing answered) too
    assert files.table(LEVELS_FILE)["level"].tolist() == ["class", "maker", "answered", "unsure"]
    per_class = files.table(PER_CLASS_FILE)
    assert per_class["accuracy"].is_monotonic_increasing and per_class["images"].sum() == len(test)
    assert files.path(CURVE_CHART).read_bytes()[:4] == b"\x89PNG"
    assert set(report.metrics()) >= {"top5_accuracy", "implied_maker_accuracy", "class_share", "maker_threshold"}


def test_maker_predictions_are_refused_by_the_class_assessment(class_runs, tiny_model, maker_dataset):
    classes, runs, data = class_runs
    maker_run = evaluate_split(
        MakerClassifier(tiny_model.model, tiny_model.processor, maker_dataset.makers, workers=0),
        data[VALIDATION],
        max_images=4,
    )
    with pytest.raises(
        CalibrationError, match=r"no 'true_class' column but \['true_maker'\]: they answer another task"
    ):
        assess_class_answers(maker_run.predictions, runs[TEST].predictions, classes)
    with pytest.raises(CalibrationError, match="answers but the answer list has"):
        assess_class_answers(runs[VALIDATION].predictions, runs[TEST].predictions, classes[:-1])


# --- training: the class name is the completion, and checkpoints are scored on the class task -------------


def test_the_class_task_trains_on_class_names_and_scores_its_checkpoints_on_them(class_runs, tiny_model_dir, tmp_path):
    from car_maker_pipeline.training.config import LoraHyperparameters, LoraTrainingError
    from car_maker_pipeline.training.sft_data import build_sft_dataset
    from car_maker_pipeline.training.trainer import train_lora

    classes, _, data = class_runs
    prompt = CLASS.prompt(classes)
    sft = build_sft_dataset(data["train"], classes, prompt, label_column=CLASS.label_column)
    completions = [row[0]["content"][0]["text"] for row in sft.with_format(None)["completion"]]
    assert completions == column(data["train"], "source_class")
    shown = sft.with_format(None)[0]["prompt"][1]["content"][1]["text"]
    assert shown == prompt.user_text(classes) and "X6" not in shown  # the makers are listed, not the classes
    with pytest.raises(LoraTrainingError, match="not in the answer list"):
        build_sft_dataset(data["train"], classes[1:], prompt, label_column=CLASS.label_column)

    config = LoraHyperparameters(max_steps=2, checkpoint_every_n_steps=2, early_stopping_patience=2)
    result = train_lora(
        tiny_model_dir, data["train"], data[VALIDATION], classes, tmp_path / "run", config, prompt=prompt, task=CLASS
    )
    assert result.global_step == 2
    scores = result.validation_scores[2]
    assert 0.0 <= scores["val_accuracy"] <= 1.0 and 0.0 <= scores["val_coverage_at_target"] <= 1.0


# --- serving: a class-task card answers the class, else the maker, else unsure -----------------------------

SERVED = ["BMW M3 Coupe 2012", "BMW X6 SUV 2012", "Rolls-Royce Ghost Sedan 2012"]


@pytest.mark.parametrize(
    ("probabilities", "thresholds", "answer", "level"),
    [
        ([0.9, 0.05, 0.05], (0.8, 0.6), "BMW M3 Coupe 2012", "class"),
        ([0.5, 0.4, 0.1], (0.8, 0.6), "BMW", "maker"),  # BMW's classes sum to 0.9
        ([0.4, 0.2, 0.4], (0.8, 0.7), UNSURE, UNSURE),  # BMW 0.6, Rolls-Royce 0.4
        ([0.4, 0.2, 0.4], (None, None), "BMW M3 Coupe 2012", "class"),  # no policy: the top class
        ([0.5, 0.4, 0.1], (0.8, None), UNSURE, UNSURE),  # a class threshold alone: no maker answers
    ],
)
def test_a_class_card_answers_with_a_level(probabilities, thresholds, answer, level):
    from car_maker_pipeline.evaluation.scoring.classifier import Prediction
    from car_maker_pipeline.serving.predictor import ClassifierCard, answer_table

    card = ClassifierCard(
        SERVED, "tiny-s", "rev", task="class", confidence_threshold=thresholds[0], maker_threshold=thresholds[1]
    )
    prediction = Prediction(SERVED[0], probabilities[0], tuple(np.log(probabilities)))
    (row,) = answer_table([prediction], card).to_dict("records")
    assert (row["answer"], row["level"]) == (answer, level)
    assert row["maker"] == SERVED[int(np.argmax(probabilities))]  # the top class, as for every level


def test_the_class_predictor_serves_the_tiny_model_with_levels(class_runs, tiny_model):
    from car_maker_pipeline.evaluation.class_task import class_tree
    from car_maker_pipeline.evaluation.metrics.hierarchy import climb
    from car_maker_pipeline.serving.predictor import ClassifierCard, MakerPredictor

    classes, _, data = class_runs
    card = ClassifierCard(classes, "tiny-s", "rev", task="class", confidence_threshold=0.5, maker_threshold=0.3)
    assert card.prompt() == CLASS.prompt(classes)
    classifier = MakerClassifier(tiny_model.model, tiny_model.processor, classes, prompt=card.prompt(), workers=0)
    table = MakerPredictor(classifier, card).predict_images([data[TEST][i]["image"] for i in range(6)])
    assert set(table["level"]) <= {"class", "maker", UNSURE} and len(table) == 6
    scores = classifier.classify([data[TEST][i]["image"] for i in range(6)])
    expected = climb(softmax(np.stack([s.log_probs for s in scores])), class_tree(classes), 0.5, 0.3)
    assert table["answer"].tolist() == expected.answers(class_tree(classes))
