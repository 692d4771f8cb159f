"""Benchmark suite: parameters, GMACs, images/s and latency breakdown, vanilla vs train form vs fused.

Run ``python -m repa_ssl.bench --help`` (or ``scripts/benchmark.sh``). Every number of one
run comes from the same process, with the models interleaved, so ratios are comparable.
"""
from .breakdown import latency_breakdown
from .suite import SPECS, BenchConfig, run_suite

__all__ = ["SPECS", "BenchConfig", "latency_breakdown", "run_suite"]
