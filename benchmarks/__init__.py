"""Benchmarks: each module has main() and prints its figures beside a baseline measured in the same run."""
