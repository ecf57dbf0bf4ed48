"""Evaluation domain: maker-constrained classification, metrics, reports, and recording results in MLflow."""
