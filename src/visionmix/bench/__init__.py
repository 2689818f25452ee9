"""Measure models (params, MACs, speed, memory) and compare them under one training recipe (SPACH, 2108.13002)."""

from visionmix.bench.compare import PRESETS, compare, resolve_preset
from visionmix.bench.profile import (
    BenchResult,
    bench_models,
    count_macs,
    count_params,
    format_table,
    matmul_gflops,
    matmul_workload,
    peak_memory,
    profile_model,
    save_results,
    time_alternately,
    time_call,
)

__all__ = [
    "PRESETS",
    "BenchResult",
    "bench_models",
    "compare",
    "count_macs",
    "count_params",
    "format_table",
    "matmul_gflops",
    "matmul_workload",
    "peak_memory",
    "profile_model",
    "resolve_preset",
    "save_results",
    "time_alternately",
    "time_call",
]
