"""Evaluation domain: how well a model classifies makers, without MLflow or Dagster.

- scoring/: the classifier that turns pictures into every maker's probability.
- metrics/: accuracy, calibration and selective-prediction numbers and charts from stored predictions.
- split_report.py: one split evaluated into a folder (predictions, tables, figures, summary).
- answer_policy.py: the temperature and the certified "unsure" threshold from validation, measured on test.
- checkpoint_scores.py: every checkpoint of a run scored (cached; one pass over the pictures for all), the best chosen on validation.
- settings.py: the defaults the run configs share.

Recording results in MLflow and the registry lives one floor up, in `recording/`.
"""
