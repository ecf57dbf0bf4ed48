"""What both answer policies do first (the maker task's `answer_policy`, the class task's `class_task`).

- Read stored predictions as arrays: every answer's log-probability and the true answer's index.
- Split validation in two folds by each image's pixel hash: a quarter fits one temperature, the rest
  certifies the threshold(s), so a guarantee is never spent on images that chose the temperature.
- Fit the temperature on its fold, or refuse it and keep T = 1, naming why.

`split_folds` does all three for one validation and one test evaluation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from car_maker_pipeline.evaluation.metrics.calibration import TEMPERATURE_BOUNDS, CalibrationError, fit_temperature
from car_maker_pipeline.evaluation.settings import TEMPERATURE_FOLD_SHARE


def answer_log_probs(
    predictions: pd.DataFrame, makers: list[str], true_column: str = "true_maker"
) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities (n, answers), true answer indices (n,)) of stored predictions; the answers are the
    makers, or the class names of a class-task evaluation (`true_column` "true_class")."""
    if true_column not in predictions:
        other = [name for name in predictions.columns if name.startswith("true_")]
        raise CalibrationError(
            f"These predictions have no {true_column!r} column but {other}: they answer another task. "
            "Assess them with that task's policy, or evaluate the model on this task."
        )
    if "log_probs" not in predictions or predictions["log_probs"].isna().any():
        raise CalibrationError(
            "These predictions carry no per-maker probabilities (they were written before every maker was "
            "scored); materialize the evaluation again to score them."
        )
    log_probs = np.stack([np.asarray(row, dtype=float) for row in predictions["log_probs"]])
    if log_probs.shape[1] != len(makers):
        raise CalibrationError(
            f"The predictions score {log_probs.shape[1]} answers but the answer list has {len(makers)}; "
            "they come from another maker dataset. Materialize the evaluation again."
        )
    index = {maker: i for i, maker in enumerate(makers)}
    unknown = sorted(set(predictions[true_column]) - set(index))
    if unknown:
        raise CalibrationError(f"True answers {unknown} are not in the answer list {makers}.")
    return log_probs, predictions[true_column].map(index).to_numpy(dtype=int)


def temperature_fold(keys: Sequence[str], share: float = TEMPERATURE_FOLD_SHARE) -> np.ndarray:
    """True for the validation images that fit the temperature, False for those that certify the threshold.

    Decided per image by a hash of its key (the pixel hash), never by its label or position, so the folds
    are the same in every run and an image added to validation later leaves every other image's fold alone.
    """
    draws = [int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "big") for key in keys]
    return np.asarray(draws, dtype=np.float64) / 2.0**64 < share


def fold_keys(split, predictions: pd.DataFrame) -> list[str] | None:
    """Each scored validation row's pixel hash (`content_hash` of car_maker_dataset), the key of its fold;
    None for a split without one (the rows' positions decide then)."""
    from car_maker_pipeline.data.dataset_spec import column

    if "content_hash" not in split.column_names:
        return None
    hashes = column(split, "content_hash")
    if len(predictions) != len(hashes) or not predictions["index"].between(0, len(hashes) - 1).all():
        raise CalibrationError(
            f"{len(predictions)} validation predictions do not match the {len(hashes)} rows of car_maker_dataset's "
            "validation split (they were scored on another build); materialize the evaluation again."
        )
    return [hashes[int(index)] for index in predictions["index"]]


@dataclass(frozen=True)
class TemperatureChoice:
    temperature: float  # the one applied: the fit, or 1.0 when it was refused
    fitted: float  # what the fit gave (NaN when no fit was tried)
    refused: str  # why the fit is not used ("" when it is)


def choose_temperature(log_probs: np.ndarray, truth: np.ndarray) -> TemperatureChoice:
    """The temperature fitted on these images, unless the fit cannot name a useful scale: then T = 1 and why.

    On images the model gets all right, the loss falls as T falls without end, so the fit runs to the search
    range's lower bound and every answer looks certain (the reverse when it gets all wrong); a fit that
    lands on a bound for any other reason says the same. A fold of one maker only teaches to favour it.
    """
    images = len(truth)
    correct = log_probs.argmax(axis=1) == truth if images else np.zeros(0, dtype=bool)
    makers = len(np.unique(truth))
    if makers < 2:
        return TemperatureChoice(1.0, math.nan, f"the temperature fold holds {images} image(s) of {makers} maker(s)")
    if correct.all() or not correct.any():
        which = "every one" if correct.all() else "none"
        return TemperatureChoice(
            1.0, math.nan, f"the model answers {which} of the {images} temperature-fold images right, so no scale fits"
        )
    fitted = fit_temperature(log_probs, truth)
    if min(abs(math.log(fitted / bound)) for bound in TEMPERATURE_BOUNDS) < 1e-3:
        return TemperatureChoice(
            1.0, fitted, f"the fit landed on the search range's bound (T = {fitted:.3g} of {TEMPERATURE_BOUNDS})"
        )
    return TemperatureChoice(fitted, fitted, "")


@dataclass(frozen=True)
class SplitFolds:
    val_log_probs: np.ndarray  # (validation images, answers)
    val_truth: np.ndarray
    test_log_probs: np.ndarray
    test_truth: np.ndarray
    fitting: np.ndarray  # True: the image fits the temperature; False: it certifies the threshold(s)
    temperature: TemperatureChoice

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.val_log_probs, self.val_truth, self.test_log_probs, self.test_truth


def split_folds(
    validation: pd.DataFrame,
    test: pd.DataFrame,
    answers: list[str],
    true_column: str = "true_maker",
    fold_keys: Sequence[str] | None = None,
) -> SplitFolds:
    """Both evaluations as arrays, validation's folds and the temperature fitted on its fold.

    `fold_keys`: one key per validation row (its pixel hash) deciding its fold; without them, the rows'
    `index` (or position).
    """
    val_log_probs, val_truth = answer_log_probs(validation, answers, true_column)
    test_log_probs, test_truth = answer_log_probs(test, answers, true_column)
    positions = validation["index"] if "index" in validation else range(len(validation))
    keys = list(positions) if fold_keys is None else list(fold_keys)
    if len(keys) != len(val_truth):
        raise CalibrationError(f"{len(keys)} fold keys for {len(val_truth)} validation rows; pass one per row")
    fitting = temperature_fold(keys)
    choice = choose_temperature(val_log_probs[fitting], val_truth[fitting])
    return SplitFolds(val_log_probs, val_truth, test_log_probs, test_truth, fitting, choice)
