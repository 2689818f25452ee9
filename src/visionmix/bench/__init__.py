"""Measure models (params, MACs, speed, memory) and compare them under one training recipe (SPACH, 2108.13002)."""

from visionmix.bench.compare import PAPER_CLAIMS, PRESETS, Claim, compare, resolve_preset
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
from visionmix.bench.stats import PairedDifference, claim_verdict, paired_difference, t_quantile

__all__ = [
    "PAPER_CLAIMS",
    "PRESETS",
    "BenchResult",
    "Claim",
    "PairedDifference",
    "bench_models",
    "claim_verdict",
    "compare",
    "count_macs",
    "count_params",
    "format_table",
    "matmul_gflops",
    "matmul_workload",
    "paired_difference",
    "peak_memory",
    "profile_model",
    "resolve_preset",
    "save_results",
    "t_quantile",
    "time_alternately",
    "time_call",
]
