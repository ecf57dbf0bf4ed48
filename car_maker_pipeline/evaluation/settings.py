"""Evaluation settings that the Dagster run configs and the plain functions share.

Kept free of numpy, torch and pandas: the asset modules import it when Dagster loads the definitions.
"""

# The precision the classifier must reach on the images it answers; below the matching confidence
# threshold (chosen on validation) it answers "unsure".
DEFAULT_TARGET_PRECISION = 0.99
# Temperatures and thresholds are fitted on this split, never on test.
CALIBRATION_SPLIT = "validation"
# How the best checkpoint is chosen, always on validation: its accuracy, or the share of validation
# images it answers at the target precision. Ties go to validation accuracy, the lower validation
# loss, then the later step.
SELECTION_METRICS = {"val_accuracy": "validation accuracy", "val_coverage_at_target": "validation coverage at target"}
DEFAULT_SELECTION_METRIC = "val_accuracy"
# Batches the evaluator prepares ahead of the model (when it prepares in threads): enough to hide one
# slow batch (a run of large photos) behind the model, few enough that memory holds at most one more
# than this many batches of the processor's tensors.
DEFAULT_PREFETCH = 2
# Large stored JPEGs decoded at a reduced size where the image processor shrinks them anyway
# (`Image.draft`). Off: training decodes at full size, and the agreement with a full decode was
# measured on the tiny models only (bench/README.md, *Draft decoding*).
DRAFT_DECODE = False
