"""Timing protocol shared by the benchmarks and ``visionmix.deploy``: interleaved rounds, medians and quartiles.

Callables timed together run one sample each per round, in rotating order, so a shared machine's drift hits them
alike and the ratios of their medians are fair (DESIGN.md, "speed targets are ratios measured in one process").
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from visionmix.checks import check_positive
from visionmix.errors import InvalidValue


@dataclass(frozen=True)
class Timing:
    """Seconds per call over repeated samples: median and quartiles."""

    median: float
    q1: float
    q3: float
    samples: int

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (0.05 = the middle half of the runs lie within 5%)."""
        return (self.q3 - self.q1) / self.median


def time_alternately(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 10,
                     min_sample_s: float = 0.02, sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time several callables in interleaved rounds, one sample of each per round, so that the drift of a shared
    machine hits them alike and ratios of their medians are fair.

    Each callable gets ``warmup`` calls, then ``repeats`` samples, each looping it enough times to last about
    ``min_sample_s`` seconds. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InvalidValue(f"warmup must be a non-negative int, got {warmup!r}")
    if check_positive("repeats", repeats) < 2:
        raise InvalidValue(f"repeats must be at least 2 to give a spread, got {repeats}")
    if not fns:
        raise InvalidValue("fns must hold at least one callable")
    sync = sync or (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = clock()
        fn()
        inner[name] = max(1, math.ceil(min_sample_s / max(clock() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        # rotate the order so each callable follows every other equally often (a cold cache after a big one)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn = fns[name]
            start = clock()
            for _ in range(inner[name]):
                fn()
            samples[name].append((clock() - start) / inner[name])
    timings = {}
    for name, values in samples.items():
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        timings[name] = Timing(median, q1, q3, repeats)
    return timings


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 10, min_sample_s: float = 0.02,
              sync: Callable[[], None] | None = None) -> Timing:
    """Time one callable (see :func:`time_alternately` for the protocol)."""
    return time_alternately({"fn": fn}, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s, sync=sync)["fn"]
