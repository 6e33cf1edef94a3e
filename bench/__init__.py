"""Benchmarks: each prints the baseline and ours side by side from one run and writes JSON."""
