"""Evaluation settings that the Dagster run configs and the plain functions share.

Kept free of numpy, torch and pandas: the asset modules import it when Dagster loads the definitions.
"""

from car_maker_pipeline.settings import get_profile

# The precision the classifier must keep on the images it answers; below the confidence threshold
# certified for it on validation it answers "unsure". The demo profile promises 95%: its 216 validation
# images (a quarter of them fit the temperature) cannot certify 99%, which needs the 505 most confident
# threshold-fold images without a mistake when 8 checkpoints are compared.
DEFAULT_TARGET_PRECISION = 0.99
DEMO_TARGET_PRECISION = 0.95
# The chance that the promise fails: with probability at least 1 - delta over the validation images
# drawn, precision on new images is at least the target (Learn then Test, metrics/certification.py).
DEFAULT_DELTA = 0.05
# Temperatures and thresholds are fitted on this split, never on test. It is whatever rows
# car_maker_dataset puts in validation: labelled images added later and marked for validation join
# it there and certify more. Each row's fold (below) follows from its pixel hash, so added rows never
# move the rows already there from one fold to the other.
CALIBRATION_SPLIT = "validation"
# The share of validation that fits the temperature; the rest certifies the threshold. The threshold's
# guarantee needs images that chose nothing about the model, so the two never share an image.
TEMPERATURE_FOLD_SHARE = 0.25
# How the best checkpoint is chosen, always on validation: its accuracy, or the share of the threshold
# fold it answers with the target certified. Ties go to validation accuracy, the lower validation loss,
# then the later step. Either way the same images then certify it, so each checkpoint is certified at
# delta / (checkpoints compared).
SELECTION_METRICS = {"val_accuracy": "validation accuracy", "val_coverage_at_target": "certified validation coverage"}
DEFAULT_SELECTION_METRIC = "val_accuracy"
# Batches the evaluator prepares ahead of the model (when it prepares in threads): enough to hide one
# slow batch (a run of large photos) behind the model, few enough that memory holds at most one more
# than this many batches of the processor's tensors.
DEFAULT_PREFETCH = 2
# Large stored JPEGs decoded at a reduced size where the image processor shrinks them anyway
# (`Image.draft`). Off: training decodes at full size, and the agreement with a full decode was
# measured on the tiny models only (bench/README.md, *Draft decoding*).
DRAFT_DECODE = False
# With CUDA, LFM2-VL's image processor resizes, tiles and normalises on the GPU (its `device` argument), where
# one core's processor would keep the GPU waiting (bench/README.md, *GPU*); the JPEG decode stays on the CPU.
PROCESS_ON_DEVICE = True


def default_target_precision(profile: str | None = None) -> float:
    """The target a run uses unless its config says otherwise: 95% on the demo profile, 99% on real data."""
    return DEMO_TARGET_PRECISION if get_profile(profile).is_demo else DEFAULT_TARGET_PRECISION
