"""Data domain: the source dataset (real or synthetic demo) and the maker-level dataset built from it."""
