"""Benchmarks: throughput, latency, peak memory and FLOPs of a pipeline (`effigen bench`)."""

from .throughput import (
    benchmark_pipeline,
    benchmark_runs,
    compare,
    count_flops,
    environment,
    measure_matmul_peak,
    measure_peak_memory,
)

__all__ = [
    "benchmark_pipeline",
    "benchmark_runs",
    "compare",
    "count_flops",
    "environment",
    "measure_matmul_peak",
    "measure_peak_memory",
]
