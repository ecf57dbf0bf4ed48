"""Hierarchical answers for the class task (evaluation/metrics/hierarchy.py) and what a buyer reads (accuracy.py).

The tree below: maker A has classes a1, a2, a3; B has b1, b2; C has c1.

| class probabilities (a1 a2 a3 b1 b2 c1) | thresholds (class, maker) | level  | answer |
|------------------------------------------|---------------------------|--------|--------|
| .90 .05 .05 0 0 0                         | .8, .8                    | class  | a1     |
| .50 .30 .15 .05 0 0                       | .8, .8                    | maker  | A      |
| .40 .10 0 .45 .05 0                       | .8, .8                    | unsure | unsure |
| .40 .10 0 .45 .05 0                       | .8, .5                    | maker  | A (ties B at .50: the first maker) |
| .30 .30 0 .20 .20 0                       | .8, .55                   | maker  | A (.60) |
| .20 .20 .20 .20 .20 0                     | .19, .19                  | class  | a1 (the first of equals) |
| 0 0 0 0 0 1                               | 1.0, 1.0                  | class  | c1     |
| 0 0 0 0 0 1                               | NOTHING_ANSWERED, 1.0     | maker  | C      |

Certified thresholds (simulation, calibrated classes drawn from their own probabilities, 400 draws of 400
validation images; precision on 20,000 new images is its expectation under those probabilities): a pair
fails when the new images' class and maker answers are right less often than the target.

| rule                                                     | failures at 90%, delta 0.05        |
|----------------------------------------------------------|------------------------------------|
| certified pair (Learn then Test over the class grid)     | <= delta + 3 standard errors        |
| lowest thresholds meeting the target on validation       | > delta + 3 standard errors          |
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import confusion_matrix

from car_maker_pipeline.evaluation.metrics.accuracy import (
    class_task_summary,
    confused_pairs_within_maker,
    per_class_accuracy,
)
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError
from car_maker_pipeline.evaluation.metrics.certification import NOTHING_ANSWERED, certify_threshold
from car_maker_pipeline.evaluation.metrics.hierarchy import (
    CLASS_GRID,
    ClassTree,
    HierarchicalThresholds,
    climb,
    climbing_curve,
    fit_thresholds,
    hierarchical_risk_coverage_png,
    level_table,
)
from car_maker_pipeline.evaluation.metrics.selective import risk_coverage

TREE = ClassTree.from_class_makers(["a1", "a2", "a3", "b1", "b2", "c1"], ["A", "A", "A", "B", "B", "C"])
MAKER_OF = dict(zip(TREE.classes, (TREE.makers[i] for i in TREE.maker_index)))


@pytest.mark.parametrize(
    ("probabilities", "thresholds", "level", "answer"),
    [
        ([0.9, 0.05, 0.05, 0, 0, 0], (0.8, 0.8), "class", "a1"),
        ([0.5, 0.3, 0.15, 0.05, 0, 0], (0.8, 0.8), "maker", "A"),
        ([0.4, 0.1, 0, 0.45, 0.05, 0], (0.8, 0.8), "unsure", "unsure"),
        ([0.4, 0.1, 0, 0.45, 0.05, 0], (0.8, 0.5), "maker", "A"),
        ([0.3, 0.3, 0, 0.2, 0.2, 0], (0.8, 0.55), "maker", "A"),
        ([0.2, 0.2, 0.2, 0.2, 0.2, 0], (0.19, 0.19), "class", "a1"),
        ([0, 0, 0, 0, 0, 1], (1.0, 1.0), "class", "c1"),
        ([0, 0, 0, 0, 0, 1], (NOTHING_ANSWERED, 1.0), "maker", "C"),
    ],
)
def test_climbing_answers_the_class_then_the_maker_then_unsure(probabilities, thresholds, level, answer):
    climbed = climb(np.array([probabilities]), TREE, *thresholds)
    assert ("class", "maker", "unsure")[int(climbed.level[0])] == level
    assert climbed.answers(TREE) == [answer]


def test_maker_probabilities_are_the_sums_of_their_classes():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(6), size=50)
    oracle = pd.DataFrame(probabilities, columns=TREE.classes).T.groupby(MAKER_OF).sum().T[list(TREE.makers)]
    np.testing.assert_allclose(TREE.maker_probabilities(probabilities), oracle.to_numpy())
    # a maker answer rules out the classes of other makers: log(6 / classes) / log 6 of the tree
    np.testing.assert_allclose(TREE.maker_information(), 1 - np.log([3, 2, 1]) / np.log(6))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: climb(np.full((2, 5), 0.2), TREE, 0.5, 0.5), "5 columns but the tree has 6 classes"),
        (lambda: climb(np.full((1, 6), 0.5), TREE, 0.5, 0.5), "sum to 1"),
        (lambda: ClassTree.from_class_makers(["x", "x"], ["A", "A"]), "unique"),
        (lambda: ClassTree.from_class_makers(["x", "y"], ["A"]), "one maker per class"),
        (lambda: ClassTree.from_class_makers(["x"], ["A"], makers=["B"]), r"makers \['A'\]"),
        (lambda: fit_thresholds(np.full((1, 6), 1 / 6), [6], TREE, 0.9, 0.05), "index 6"),
        (lambda: fit_thresholds(np.full((1, 6), 1 / 6), [0], TREE, 1.5, 0.05), "target precision"),
    ],
)
def test_bad_input_is_refused_with_what_to_pass(call, match):
    with pytest.raises(CalibrationError, match=match):
        call()


def _calibrated_draw(rng, images: int, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities with a spread of confidence, and true classes drawn from them (so perfectly calibrated)."""
    sharpness = rng.uniform(0.5, 6.0, size=(images, 1))
    probabilities = rng.dirichlet(np.ones(classes), size=images) ** sharpness
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    truth = (probabilities.cumsum(axis=1) > rng.uniform(size=(images, 1))).argmax(axis=1)
    return probabilities, truth


def _expected_precision(probabilities, thresholds: tuple[float, float]) -> float:
    """Precision of the class and maker answers on these images, in expectation over their true classes."""
    climbed = climb(probabilities, TREE, *thresholds)
    expected_right = np.where(climbed.level == 0, climbed.class_confidence, climbed.maker_confidence)
    answered = climbed.level < 2
    return float(expected_right[answered].sum() / answered.sum()) if answered.any() else 1.0


def _lowest_meeting_the_target_on_validation(probabilities, truth, target) -> tuple[float, float]:
    """The uncertified rule: per class threshold, the lowest maker threshold whose validation precision meets
    the target; the pair answering the most images."""
    best, most = (NOTHING_ANSWERED, NOTHING_ANSWERED), 0
    for class_threshold in CLASS_GRID:
        climbed = climb(probabilities, TREE, class_threshold, 0.0)
        right = climbed.correct(TREE, truth)
        score = np.where(climbed.level == 0, 2.0, climbed.maker_confidence)
        curve = risk_coverage(np.minimum(score, 1.0), right)
        meeting = curve[curve["accuracy"] >= target]
        if len(meeting) and int(meeting["answered"].iloc[-1]) > most:
            most = int(meeting["answered"].iloc[-1])
            best = (class_threshold, float(meeting["threshold"].iloc[-1]))
    return best


def test_certified_thresholds_keep_the_target_on_new_images_where_the_plain_rule_does_not():
    rng = np.random.default_rng(7)
    target, delta, draws = 0.9, 0.05, 400
    tolerance = 3 * math.sqrt(delta * (1 - delta) / draws)
    new_images, _ = _calibrated_draw(rng, 20_000)
    failures = {"certified": 0, "plain": 0}
    answered_draws = 0
    for _ in range(draws):
        probabilities, truth = _calibrated_draw(rng, 400)
        fitted = fit_thresholds(probabilities, truth, TREE, target, delta)
        answered_draws += fitted.certified
        pair = (fitted.class_threshold, fitted.maker_threshold)
        failures["certified"] += _expected_precision(new_images, pair) < target
        plain = _lowest_meeting_the_target_on_validation(probabilities, truth, target)
        failures["plain"] += _expected_precision(new_images, plain) < target
    print(f"\nfailures in {draws} draws: {failures}; certified in {answered_draws}")
    assert failures["certified"] / draws <= delta + tolerance, failures
    assert failures["plain"] / draws > delta + tolerance, failures
    assert answered_draws >= 0.8 * draws  # the promise is not kept by answering nothing


def test_the_pair_chosen_is_the_certified_one_answering_the_most_information():
    """Oracle: each class threshold of the grid certified on its own with the scalar rule at delta / grid size."""
    rng = np.random.default_rng(3)
    probabilities, truth = _calibrated_draw(rng, 600)
    fitted = fit_thresholds(probabilities, truth, TREE, 0.85, 0.1)
    information = TREE.maker_information()
    candidates = []
    for class_threshold in CLASS_GRID:
        climbed = climb(probabilities, TREE, class_threshold, 0.0)
        score = np.where(climbed.level == 0, 2.0, climbed.maker_confidence)
        right = climbed.correct(TREE, truth)
        # the scalar rule wants probabilities: class-level images at 1.0 still rank first (maker ones are <= 1)
        found = certify_threshold(np.minimum(score, 1.0), right, 0.85, 0.1, comparisons=len(CLASS_GRID))
        if found.certified:
            maker_threshold = found.threshold if found.answered > (score >= 2).sum() else NOTHING_ANSWERED
            level = climb(probabilities, TREE, class_threshold, maker_threshold).level
            value = (level == 0).sum() + information[climbed.maker_index[level == 1]].sum()
            candidates.append((value, -CLASS_GRID.index(class_threshold), class_threshold))
    assert candidates, "the oracle certified nothing: the draw is too hard for this test"
    assert fitted.certified and fitted.class_threshold == max(candidates)[2]
    assert fitted.class_answered + fitted.maker_answered > 0
    assert "precision is certified" in fitted.statement()


def test_too_few_validation_images_answer_nothing_and_say_why():
    probabilities = np.eye(6)[[0, 1, 3]]
    fitted = fit_thresholds(probabilities, [0, 1, 3], TREE, 0.99, 0.05)
    assert not fitted.certified and fitted.class_threshold == fitted.maker_threshold == NOTHING_ANSWERED
    assert "cannot be certified" in fitted.statement() and "Add validation images" in fitted.statement()
    assert set(climb(probabilities, TREE, fitted.class_threshold, fitted.maker_threshold).level) == {2}


def test_level_table_counts_each_level_with_wilson_intervals():
    rng = np.random.default_rng(11)
    probabilities, truth = _calibrated_draw(rng, 300)
    thresholds = HierarchicalThresholds(0.8, 0.6, 0.9, 0.05, 1, True, 0, 0, 0, 0)
    table = level_table(probabilities, truth, TREE, thresholds).set_index("level")
    climbed = climb(probabilities, TREE, 0.8, 0.6)
    right = climbed.correct(TREE, truth)
    assert table.loc[["class", "maker", "unsure"], "images"].sum() == 300
    assert table.loc["answered", "images"] == (climbed.level < 2).sum()
    for level, mask in (("class", climbed.level == 0), ("maker", climbed.level == 1), ("answered", climbed.level < 2)):
        oracle = stats.binomtest(int(right[mask].sum()), int(mask.sum())).proportion_ci(method="wilson")
        assert table.loc[level, "correct"] == right[mask].sum()
        assert table.loc[level, ["ci_low", "ci_high"]].tolist() == pytest.approx([oracle.low, oracle.high])
    assert math.isnan(table.loc["unsure", "precision"])


def test_climbing_curve_matches_one_threshold_at_every_level():
    rng = np.random.default_rng(5)
    probabilities, truth = _calibrated_draw(rng, 80)
    curve = climbing_curve(probabilities, truth, TREE)
    assert curve["coverage"].is_monotonic_increasing and curve["coverage"].iloc[-1] == 1.0
    for row in curve.sample(15, random_state=0).itertuples():
        climbed = climb(probabilities, TREE, row.threshold, row.threshold)
        assert row.answered == (climbed.level < 2).sum()
        assert row.accuracy == pytest.approx(climbed.correct(TREE, truth)[climbed.level < 2].mean())
        assert row.class_share == pytest.approx((climbed.level == 0).mean())


def test_the_chart_draws_the_climbing_curve_beside_the_flat_ones(tmp_path, monkeypatch):
    from car_maker_pipeline.evaluation.metrics import selective

    rng = np.random.default_rng(2)
    probabilities, truth = _calibrated_draw(rng, 60)
    drawn = {}
    draw = selective.risk_coverage_png
    monkeypatch.setattr(
        selective, "risk_coverage_png", lambda curves, *args: drawn.update(curves) or draw(curves, *args)
    )
    path = hierarchical_risk_coverage_png(probabilities, truth, TREE, tmp_path / "curve.png", "tiny-s", 0.9)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    climbed = climb(probabilities, TREE, NOTHING_ANSWERED, NOTHING_ANSWERED)
    true_maker = np.asarray(TREE.maker_index)[truth]
    expected = {
        "class, then maker (climbing)": climbing_curve(probabilities, truth, TREE),
        "class only": risk_coverage(climbed.class_confidence, climbed.class_index == truth),
        "maker only (summed classes)": risk_coverage(climbed.maker_confidence, climbed.maker_index == true_maker),
    }
    assert list(drawn) == list(expected)
    for name, curve in expected.items():
        pd.testing.assert_frame_equal(drawn[name], curve)


# --- what a buyer reads ---------------------------------------------------------------------------------


def test_class_task_summary_and_per_class_accuracy_agree_with_scikit_learn():
    rng = np.random.default_rng(9)
    true = rng.choice(TREE.classes, size=200)
    predicted = np.where(rng.uniform(size=200) < 0.6, true, rng.choice(TREE.classes, size=200))
    summary = class_task_summary(true, predicted, MAKER_OF)
    true_makers, predicted_makers = [MAKER_OF[c] for c in true], [MAKER_OF[c] for c in predicted]
    assert summary["class_accuracy"] == pytest.approx(np.mean(true == predicted))
    assert summary["implied_maker_accuracy"] == pytest.approx(np.mean(np.equal(true_makers, predicted_makers)))
    assert summary["right_maker_wrong_model"] == pytest.approx(
        summary["implied_maker_accuracy"] - summary["class_accuracy"]
    )
    matrix = confusion_matrix(true, predicted, labels=list(TREE.classes))
    recall = matrix.diagonal() / matrix.sum(axis=1)
    table = per_class_accuracy(true, predicted, TREE.classes)
    assert table["accuracy"].is_monotonic_increasing  # worst first
    assert dict(zip(table["class"], table["accuracy"])) == pytest.approx(dict(zip(TREE.classes, recall)))

    pairs = confused_pairs_within_maker(true, predicted, MAKER_OF, top=50)
    for row in pairs.itertuples():
        i, j = TREE.classes.index(row.true_class), TREE.classes.index(row.predicted_class)
        assert MAKER_OF[row.true_class] == MAKER_OF[row.predicted_class] == row.maker and i != j
        assert row.images == matrix[i, j] and row.share == pytest.approx(matrix[i, j] / matrix[i].sum())
    same_maker_mistakes = sum(
        matrix[i, j]
        for i, a in enumerate(TREE.classes)
        for j, b in enumerate(TREE.classes)
        if i != j and MAKER_OF[a] == MAKER_OF[b]
    )
    assert pairs["images"].sum() == same_maker_mistakes
    assert pairs["images"].is_monotonic_decreasing


@pytest.mark.parametrize(
    ("true", "predicted", "expected"),
    [
        (["a1", "a2"], ["a1", "a2"], (1.0, 1.0, 0.0)),  # all right
        (["a1", "a2"], ["a2", "a1"], (0.0, 1.0, 1.0)),  # right maker, wrong model
        (["a1", "b1"], ["c1", "a1"], (0.0, 0.0, 0.0)),  # wrong makers
    ],
)
def test_class_task_summary_spec(true, predicted, expected):
    summary = class_task_summary(true, predicted, MAKER_OF)
    figures = (summary["class_accuracy"], summary["implied_maker_accuracy"], summary["right_maker_wrong_model"])
    assert figures == expected
    assert summary["class_accuracy_ci_low"] <= summary["class_accuracy"] <= summary["class_accuracy_ci_high"]


def test_a_class_missing_from_the_map_is_named():
    with pytest.raises(ValueError, match=r"\['z9'\] have no maker"):
        class_task_summary(["a1"], ["z9"], MAKER_OF)
    assert confused_pairs_within_maker(["a1"], ["a1"], MAKER_OF).empty
