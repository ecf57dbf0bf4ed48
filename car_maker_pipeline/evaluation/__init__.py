"""Evaluation domain: prompts, maker-constrained classification, metrics and reports."""
