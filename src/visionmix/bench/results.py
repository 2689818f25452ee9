"""The comparison's rows: each model's accuracy over its seeds, cost and speed, and its paired difference to the
baseline (``visionmix.bench.stats``); one row per paper's claim whose two models were compared."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from visionmix.bench.presets import Claim
from visionmix.bench.stats import PairedDifference, claim_verdict, paired_difference


@dataclass
class RunOutcome:
    """One (model, seed): the engine's summary if it finished, else the error and the log holding its details."""

    model: str
    seed: int
    summary: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False
    log: str | None = None
    time: dict[str, float] | None = None  # where the run's time went (seconds; see visionmix.bench.launch.gather)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


_BENCH_KEYS = ("params", "macs", "throughput", "throughput_spread", "latency_ms", "peak_mem_mb")


def summarize(model: str, outcomes: Sequence[RunOutcome], bench: dict[str, Any] | None,
              bench_error: str | None) -> dict[str, Any]:
    """One results row for ``model``: accuracy mean/std over finished seeds, cost and speed, status and error."""
    done = [o.summary for o in outcomes if o.summary is not None]
    errors = [f"seed {o.seed}: {o.error}" + (f" (log: {o.log})" if o.log else "") for o in outcomes if o.error]
    if bench_error:
        errors.append(f"bench: {bench_error}")
    if not done:
        status = "failed"
    elif len(done) < len(outcomes):
        status = f"partial ({len(done)}/{len(outcomes)})"
    else:
        status = "bench failed" if bench_error else "ok"
    top1, top1_std = _mean_std([s["top1"] for s in done])
    top5, top5_std = _mean_std([s["top5"] for s in done])
    bench = bench or {}
    return {
        "model": model, "status": status, "seeds": len(done), "top1": top1, "top1_std": top1_std, "top5": top5,
        "top5_std": top5_std, "train_params": done[0]["params"] if done else None,
        **{key: bench.get(key) for key in _BENCH_KEYS}, "bench_batch_size": bench.get("batch_size"),
        "train_time_s": _mean_std([s["train_time_s"] for s in done])[0],
        "train_images_per_s": _mean_std([s["train_images_per_s"] for s in done])[0],
        "error": "; ".join(errors) or None,
    }


def _top1_by_seed(outcomes: Sequence[RunOutcome]) -> dict[str, dict[int, float]]:
    by_model: dict[str, dict[int, float]] = {}
    for o in outcomes:
        if o.summary is not None:
            by_model.setdefault(o.model, {})[o.seed] = o.summary["top1"]
    return by_model


def paired(top1: Mapping[str, Mapping[int, float]], model_a: str, model_b: str) -> PairedDifference:
    """The paired difference of top-1, ``model_a`` - ``model_b``, over the seeds both finished."""
    a, b = top1.get(model_a, {}), top1.get(model_b, {})
    seeds = sorted(a.keys() & b.keys())
    return paired_difference([a[s] for s in seeds], [b[s] for s in seeds])


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def with_differences(rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
                     baseline: str) -> list[dict[str, Any]]:
    """``rows`` with each model's paired difference to ``baseline``: pairs, delta, ci_low, ci_high, verdict."""
    top1 = _top1_by_seed(outcomes)
    result = []
    for row in rows:
        if row["model"] == baseline:
            extra = {"pairs": None, "delta": None, "ci_low": None, "ci_high": None, "verdict": "baseline"}
        else:
            diff = paired(top1, row["model"], baseline)
            extra = {"pairs": diff.n, "delta": _rounded(diff.mean), "ci_low": _rounded(diff.low),
                     "ci_high": _rounded(diff.high), "verdict": diff.verdict}
        result.append({**row, **extra})
    return result


def claim_rows(rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
               claims: Sequence[Claim]) -> list[dict[str, Any]]:
    """One row per claim whose two models are both in ``rows``: Δ top-1 (A - B), its interval, MACs, verdict."""
    macs = {r["model"]: r["macs"] for r in rows}
    top1 = _top1_by_seed(outcomes)
    result = []
    for claim in claims:
        if claim.model_a not in macs or claim.model_b not in macs:
            continue
        diff = paired(top1, claim.model_a, claim.model_b)
        result.append({"paper": claim.paper, "claim": claim.statement, "model_a": claim.model_a,
                       "model_b": claim.model_b, "kind": claim.kind, "pairs": diff.n, "delta": _rounded(diff.mean),
                       "ci_low": _rounded(diff.low), "ci_high": _rounded(diff.high),
                       "macs_a": macs[claim.model_a], "macs_b": macs[claim.model_b],
                       "verdict": claim_verdict(diff, claim.kind)})
    return result
