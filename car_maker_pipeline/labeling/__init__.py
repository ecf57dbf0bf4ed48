"""Labeled additions to the dataset and the review queue that asks for them (no Dagster here)."""
