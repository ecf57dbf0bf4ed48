"""Metrics: numbers and charts from stored predictions, no model. `accuracy.py` (Wilson intervals,
per-maker tables, confusion matrix), `calibration.py` (top-k, log loss, ECE, temperature),
`selective.py` (risk-coverage, a threshold applied), `certification.py` (the threshold certified for a
target precision, Learn then Test), `figures.py` (confusion matrix and misclassified grid)."""
