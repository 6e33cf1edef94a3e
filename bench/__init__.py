"""Benchmarks: each prints the baseline and ours side by side from one run and writes JSON.

OpenMP spin-waiting makes small matrix products up to 50x slower on 2-vCPU machines, so every
benchmark runs with OMP_WAIT_POLICY=PASSIVE, for both sides of a comparison. It must be set
before torch is imported, which is why it is set here, when the package is first imported.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
