"""The precision promise: a threshold certified by Learn then Test, and temperatures that cannot degenerate.

Simulation (support/precision_simulation.py; 1,000 draws per case, each a validation set and 10,000 new
test images from the same distribution). A draw fails when the test images its threshold answers are
right less often than the target. With delta = 0.05 the failure rate must stay within delta plus a
Monte Carlo tolerance of three binomial standard errors, 3 sqrt(0.05 x 0.95 / 1000) = 0.021:

| distribution  | validation | target | certified threshold                        | today's rule (lowest level meeting it) |
|---------------|------------|--------|--------------------------------------------|----------------------------------------|
| calibrated    | 300        | 90%    | fails <= 0.071; answers in >= 60% of draws  | fails > 0.071                          |
| overconfident | 500        | 80%    | fails <= 0.071; answers in >= 90% of draws  | fails > 0.071                          |
| separable     | 36         | 99%    | fails <= 0.071 (answers nothing: 36 images cannot certify 99%) | fails > 0.071; >= 50% of validations separable |
| separable     | 300        | 90%    | fails <= 0.071; answers in >= 95% of draws  | (meets 90% too)                        |

Rule and its parts:

| case                                                        | expected                                                       |
|-------------------------------------------------------------|----------------------------------------------------------------|
| random sets (<= 60 images, ties), targets 0.6-0.95, 1-3 models | the threshold a plain loop over ranks with scipy's binomtest picks |
| first answered images needed: 99%, 90%; 8 models; 100%      | 299, 29; 505, 49; inf (ceil(ln 0.05 / ln target))              |
| sequence starts for 36/600/2000/135 images                  | none; [299]; [90, 180, 360, 720, 1440]; [55, 110] (8 models)    |
| 36 images all right at 99%                                  | not certified, "about 299 answered images without error", best 92% |
| 36 images all right at 92% / 92.1%                          | certified, all answered / not certified                        |
| a set with no right answer                                  | not certified, best 0%, the message; no crash                  |
| target 100%                                                 | not certified; the message says no finite number certifies it  |
| delta 0, 1, 1.5, -0.1, NaN, True, "0.05", None               | CalibrationError naming the value; refused by both configs     |
| temperature fold of keys                                    | about a quarter; a key's fold never changes when others join   |
| fold keys of scored validation rows                         | their pixel hashes in row order; another build's rows refused   |
| temperature on a fold all right / all wrong / one maker / at the bound | refused: T = 1 and the reason                       |
| temperature on ordinary scores                              | the fit, inside the range                                      |
| calibrate                                                   | folds disjoint; labels of one fold never move the other's choice |
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from car_maker_pipeline.evaluation.answer_policy import calibrate
from car_maker_pipeline.evaluation.metrics.calibration import CalibrationError, softmax
from car_maker_pipeline.evaluation.metrics.certification import (
    NOTHING_ANSWERED,
    certify_threshold,
    check_delta,
    fixed_sequence_search,
    images_needed,
    sequence_starts,
)
from car_maker_pipeline.evaluation.validation_folds import choose_temperature, fold_keys, temperature_fold
from car_maker_pipeline_tests.support.precision_simulation import draw, on_new_images, separable_share, todays_rule

DELTA, DRAWS, TEST_IMAGES = 0.05, 1000, 10_000
TOLERANCE = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)  # three standard errors of a failure rate at delta


@pytest.mark.parametrize(
    ("distribution", "validation", "target", "answers_at_least", "separable_at_least"),
    [
        ("calibrated", 300, 0.90, 0.60, None),
        ("overconfident", 500, 0.80, 0.90, None),
        ("separable", 36, 0.99, 0.0, 0.50),
    ],
)
def test_the_certified_threshold_keeps_its_promise_where_todays_rule_breaks_it(
    distribution, validation, target, answers_at_least, separable_at_least
):
    rng = np.random.default_rng([7, validation, int(target * 100)])
    confidence, right = draw(distribution, rng, (DRAWS, validation))
    if separable_at_least is not None:
        assert separable_share(confidence, right) >= separable_at_least
    rules = {
        "certified": fixed_sequence_search(confidence, right, target, DELTA)["threshold"],
        "today": todays_rule(confidence, right, target),
    }
    outcomes = on_new_images(distribution, rules, target, rng, TEST_IMAGES)
    new, before = outcomes["certified"], outcomes["today"]
    assert new.failure_rate <= DELTA + TOLERANCE, new
    assert new.answering_rate >= answers_at_least, new
    assert before.failure_rate > DELTA + TOLERANCE, before


def test_on_a_separable_distribution_the_certified_threshold_answers_almost_everything():
    rng = np.random.default_rng(11)
    confidence, right = draw("separable", rng, (DRAWS, 300))
    rules = {"certified": fixed_sequence_search(confidence, right, 0.9, DELTA)["threshold"]}
    outcome = on_new_images("separable", rules, 0.9, rng, 2000)["certified"]
    assert outcome.failure_rate <= DELTA + TOLERANCE
    assert outcome.answering_rate >= 0.95 and outcome.mean_coverage >= 0.9


# --- the rule against a plain reading of it --------------------------------------------------------------


def _reference(confidence, right, target, delta, comparisons):
    """(threshold, answered) by the module docstring's words: ranks from the most confident, binomial tests
    (scipy's binomtest, "precision above target"), each sequence from its start until a test fails."""
    m, level = len(confidence), delta / comparisons
    first = lambda lvl: math.ceil(math.log(lvl) / math.log(target))  # noqa: E731
    if m < first(level):
        return None
    starts = 1
    while first(level / (starts + 1)) * 2**starts <= m:
        starts += 1
    order = sorted(range(m), key=lambda i: -confidence[i])
    best = None
    for start in (first(level / starts) * 2**j for j in range(starts)):
        for rank in range(start, m + 1):
            threshold = confidence[order[rank - 1]]
            answered = [i for i in range(m) if confidence[i] >= threshold]
            hits = sum(bool(right[i]) for i in answered)
            if stats.binomtest(hits, len(answered), target, alternative="greater").pvalue > level / starts:
                break
            if best is None or len(answered) > best[1]:
                best = (threshold, len(answered))
    return best


def test_the_search_picks_what_a_plain_loop_with_scipy_binomtest_picks():
    rng = np.random.default_rng(5)
    checked = certified = 0
    for trial in range(60):
        images = int(rng.integers(5, 61))
        confidence = np.round(rng.beta(5, 1, images), int(rng.integers(1, 4)))  # coarse values make ties
        right = rng.random(images) < confidence ** float(rng.choice([0.2, 1.0]))
        target, comparisons = float(rng.choice([0.6, 0.75, 0.9, 0.95])), int(rng.integers(1, 4))
        expected = _reference(confidence, right, target, 0.1, comparisons)
        found = certify_threshold(confidence, right, target, 0.1, comparisons)
        if expected is None:
            assert not found.certified and found.threshold == NOTHING_ANSWERED, trial
        else:
            assert (found.threshold, found.answered) == expected, trial
            assert found.errors == int(np.sum(~right[confidence >= found.threshold]))
            certified += 1
        checked += 1
    assert certified >= 10 and checked == 60  # both outcomes are exercised


@pytest.mark.parametrize(
    ("target", "comparisons", "expected"),
    [(0.99, 1, 299), (0.9, 1, 29), (0.99, 8, 505), (0.9, 8, 49), (1.0, 1, math.inf)],
)
def test_images_needed_without_error(target, comparisons, expected):
    assert images_needed(target, DELTA, 0, comparisons) == expected
    if math.isfinite(expected):  # the smallest n with target**n <= delta / comparisons
        assert target**expected <= DELTA / comparisons < target ** (expected - 1)


@pytest.mark.parametrize(
    ("images", "target", "comparisons", "starts"),
    [(36, 0.99, 1, []), (600, 0.99, 1, [299]), (2000, 0.95, 1, [90, 180, 360, 720, 1440]), (135, 0.9, 8, [55, 110])],
)
def test_sequence_starts(images, target, comparisons, starts):
    assert sequence_starts(images, target, DELTA, comparisons) == starts


@pytest.mark.parametrize(("target", "certified"), [(0.99, False), (0.92, True), (0.921, False)])
def test_thirty_six_images_all_right(target, certified):
    found = certify_threshold(np.linspace(0.5, 1.0, 36), np.ones(36, bool), target, DELTA)
    assert found.certified == certified
    assert found.best_certifiable_precision == pytest.approx(0.92)  # 0.92**36 = 0.0497 <= 0.05 < 0.921**36
    if certified:
        assert (found.answered, found.errors, found.threshold) == (36, 0, 0.5)
        assert found.certified_precision == target
    else:
        assert found.answered == 0 and found.threshold == NOTHING_ANSWERED and math.isnan(found.certified_precision)


def test_the_message_when_the_target_cannot_be_certified():
    found = certify_threshold(np.full(36, 0.999), np.ones(36, bool), 0.99, DELTA)
    message = found.statement(validation_images=48)
    assert message.startswith(
        "99% precision cannot be certified with 48 validation images; about 299 answered images without error "
        "are needed (36 of the validation images test the threshold, at 95% confidence)."
    )
    assert "The best precision these images certify is 92%." in message and "'unsure'" in message
    assert "certified:" in certify_threshold(np.full(36, 0.999), np.ones(36, bool), 0.9, DELTA).statement(48)


def test_a_set_with_no_right_answer_certifies_nothing_and_says_so():
    found = certify_threshold(np.linspace(0.3, 0.99, 50), np.zeros(50, bool), 0.9, DELTA)
    assert not found.certified and found.best_certifiable_precision == 0.0
    assert "cannot be certified" in found.statement(
        50
    ) and "best precision these images certify is 0%" in found.statement(50)


def test_a_target_of_one_is_never_certified():
    found = certify_threshold(np.ones(5000), np.ones(5000, bool), 1.0, DELTA)
    assert not found.certified and math.isinf(found.images_needed)
    assert "no finite number of images certifies 100%" in found.statement(5000)


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.5, -0.1, math.nan, True, "0.05", None])
def test_a_delta_outside_zero_one_is_refused(value):
    with pytest.raises(CalibrationError, match=r"delta must be in \(0, 1\)") as raised:
        check_delta(value)
    assert repr(value) in str(raised.value)
    from car_maker_pipeline.orchestration.assets.baseline import EvaluationConfig
    from car_maker_pipeline.orchestration.assets.evaluation import CheckpointEvaluationConfig

    for config in (EvaluationConfig, CheckpointEvaluationConfig):
        if value is not None and not isinstance(value, str):
            with pytest.raises(ValueError, match="delta"):
                config(delta=value)


# --- temperature -------------------------------------------------------------------------------------------


def test_the_temperature_fold_is_a_quarter_and_never_moves_a_key():
    keys = [f"{i:032x}" for i in range(8000)]
    fold = temperature_fold(keys)
    assert abs(fold.mean() - 0.25) < 3 * math.sqrt(0.25 * 0.75 / len(keys))
    grown = temperature_fold(keys + [f"added-{i}" for i in range(500)])
    assert (grown[: len(keys)] == fold).all()
    assert (temperature_fold(list(reversed(keys))) == fold[::-1]).all()  # a key's fold, not its position


def test_fold_keys_are_the_scored_rows_pixel_hashes():
    import datasets

    split = datasets.Dataset.from_dict({"content_hash": ["h0", "h1", "h2"], "maker": ["A", "B", "A"]})
    assert fold_keys(split, pd.DataFrame({"index": [2, 0, 1]})) == ["h2", "h0", "h1"]
    assert fold_keys(split.remove_columns("content_hash"), pd.DataFrame({"index": [0, 1, 2]})) is None
    for index in ([0, 1], [0, 1, 3]):
        with pytest.raises(CalibrationError, match="materialize the evaluation again"):
            fold_keys(split, pd.DataFrame({"index": index}))


def _scores(rng, images, makers=4, strength=2.0):
    truth = rng.integers(0, makers, images)
    logits = rng.normal(0, 1, (images, makers))
    logits[np.arange(images), truth] += rng.uniform(0, strength, images)
    return np.log(softmax(logits)), truth


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("all right", "answers every one of the"),
        ("all wrong", "answers none of the"),
        ("one maker", "of 1 maker(s)"),
        ("at the bound", "landed on the search range's bound"),
    ],
)
def test_a_degenerate_temperature_is_refused_and_says_why(case, reason):
    rng = np.random.default_rng(3)
    log_probs, truth = _scores(rng, 40)
    if case == "all right":
        truth = log_probs.argmax(axis=1)
    elif case == "all wrong":
        truth = (log_probs.argmax(axis=1) + 1) % 4
    elif case == "one maker":
        truth = np.zeros(40, dtype=int)
    else:  # scores that carry no information beyond one near-certain image: T runs to 100
        log_probs = np.log(softmax(np.zeros((40, 4))))
        log_probs[0] = np.log(softmax(np.array([[30.0, 0.0, 0.0, 0.0]])))[0]
        truth = np.where(np.arange(40) == 0, 1, truth)
    choice = choose_temperature(log_probs, truth)
    assert choice.temperature == 1.0 and reason in choice.refused, choice


def test_an_ordinary_temperature_fit_is_kept():
    log_probs, truth = _scores(np.random.default_rng(4), 200)
    choice = choose_temperature(log_probs, truth)
    assert choice.refused == "" and 0.05 < choice.temperature < 100 and choice.temperature == choice.fitted


def _frame(log_probs, truth, makers):
    return pd.DataFrame(
        {
            "index": np.arange(len(truth)),
            "true_maker": [makers[t] for t in truth],
            "predicted_maker": [makers[i] for i in log_probs.argmax(axis=1)],
            "log_probs": [list(row) for row in log_probs],
        }
    )


def test_each_fold_decides_only_its_own_part():
    makers = ["A", "B", "C", "D"]
    rng = np.random.default_rng(9)
    log_probs, truth = _scores(rng, 800, strength=6.0)
    keys = [f"image-{i}" for i in range(800)]
    fitting = temperature_fold(keys)
    test = _frame(*_scores(rng, 300, strength=6.0), makers)
    first = calibrate(_frame(log_probs, truth, makers), test, makers, 0.9, fold_keys=keys).report
    assert (first.temperature_images, first.threshold_images) == (fitting.sum(), (~fitting).sum())
    assert first.temperature_images + first.threshold_images == first.validation_images == 800
    assert first.certified and first.val_answered <= first.threshold_images and first.temperature_refused == ""
    # New labels on the threshold fold: the same temperature, another certificate.
    relabelled = truth.copy()
    relabelled[~fitting] = rng.integers(0, 4, (~fitting).sum())
    second = calibrate(_frame(log_probs, relabelled, makers), test, makers, 0.9, fold_keys=keys).report
    assert second.temperature == first.temperature and second.val_errors != first.val_errors
    # New labels on the temperature fold: another temperature, threshold-fold errors counted on the same images.
    relabelled = truth.copy()
    relabelled[fitting] = rng.integers(0, 4, fitting.sum())
    third = calibrate(_frame(log_probs, relabelled, makers), test, makers, 0.9, fold_keys=keys).report
    assert third.temperature != first.temperature and third.threshold_images == first.threshold_images
