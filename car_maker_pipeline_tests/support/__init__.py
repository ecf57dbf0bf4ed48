"""Helpers the tests share: CLI runs, a real `dagster dev`, in-process data assets, a throwaway PostgreSQL."""
