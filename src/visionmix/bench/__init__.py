"""Measure models (params, MACs, speed, memory) and compare them under one training recipe (SPACH, 2108.13002)."""

from visionmix.bench.compare import compare
from visionmix.bench.presets import PAPER_CLAIMS, PRESETS, Claim, resolve_preset
from visionmix.bench.profile import (
    BenchResult,
    bench_models,
    count_macs,
    count_params,
    matmul_gflops,
    matmul_workload,
    peak_memory,
    profile_model,
    results_table,
    save_results,
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
    "results_table",
    "matmul_gflops",
    "matmul_workload",
    "paired_difference",
    "peak_memory",
    "profile_model",
    "resolve_preset",
    "save_results",
    "t_quantile",
]
