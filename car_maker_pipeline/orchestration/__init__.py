"""Orchestration domain: Dagster resources, assets, asset checks, jobs and schedules.

Assets here stay thin: they read configuration and resources, call the plain functions of the
data, models, evaluation and training packages, and report metadata.
"""
