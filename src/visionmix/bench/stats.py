"""Paired comparison of two models over seeds, and verdicts on papers' claims.

Runs of the same seed share data order and augmentation, so model A and model B are compared seed by seed: the
differences ``d_i = a_i - b_i`` get a Student t confidence interval ``mean(d) ± t_{(1+c)/2, n-1} · s_d / sqrt(n)``
(the paired t interval). The t quantile is computed here (regularised incomplete beta, Numerical Recipes 6.4, inverted
by bisection) so that the library needs no scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from visionmix.errors import InvalidValue

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference shown"
ONE_SEED = "1 seed: cannot decide"
NO_PAIRS = "no seed finished for both"

HOLDS, DOES_NOT_HOLD, NOT_SHOWN = "holds", "does not hold", "not shown at this scale"
# What a claim says about Δ = A - B: "better" (Δ > 0), "on par" (|Δ| <= margin), "not worse" (Δ >= -margin).
CLAIM_KINDS = ("better", "on par", "not worse")
# Top-1 points within which two models count as on par, or A as not worse than B: a difference that small is within
# the seed-to-seed spread of one nano model on Fashion-MNIST, so no claim of the papers rests on it.
ON_PAR_MARGIN = 1.0


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the paired differences A - B over ``n`` seeds, its confidence interval ``[low, high]`` (``None``
    with fewer than two pairs; ``mean`` is ``None`` without any) and the verdict: better, worse, no difference shown
    (the interval contains 0), one seed cannot decide, or no pairs."""

    n: int
    mean: float | None
    low: float | None
    high: float | None
    verdict: str


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method (NR 6.4)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``0 <= x <= 1``, ``a, b > 0`` (NR 6.4)."""
    if not 0.0 <= x <= 1.0:
        raise InvalidValue(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: float) -> float:
    """``P(T > t)`` for ``t >= 0``: ``I_{df/(df+t²)}(df/2, 1/2) / 2``."""
    return 0.5 * regularized_beta(df / (df + t * t), 0.5 * df, 0.5)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if not 0.0 < p < 1.0:
        raise InvalidValue(f"p must lie strictly between 0 and 1, got {p}")
    if not df > 0:
        raise InvalidValue(f"df must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
    while high - low > 1e-13 * high:  # the tail falls as t grows: bisect to ~13 significant digits
        mid = 0.5 * (low + high)
        if _t_upper_tail(mid, df) > tail:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def paired_difference(values_a: Sequence[float], values_b: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """Paired t interval of ``values_a[i] - values_b[i]`` (same seed ``i``), df = n - 1, and its verdict."""
    if len(values_a) != len(values_b):
        raise InvalidValue(f"values_a and values_b must pair up one to one, got {len(values_a)} and {len(values_b)}")
    if not 0.0 < confidence < 1.0:
        raise InvalidValue(f"confidence must lie strictly between 0 and 1, got {confidence}")
    diffs = [a - b for a, b in zip(values_a, values_b, strict=True)]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, None, None, None, NO_PAIRS)
    mean = statistics.fmean(diffs)
    if n == 1:
        return PairedDifference(1, mean, None, None, ONE_SEED)
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = BETTER if low > 0 else WORSE if high < 0 else NO_DIFFERENCE
    return PairedDifference(n, mean, low, high, verdict)


def claim_verdict(diff: PairedDifference, kind: str, margin: float = ON_PAR_MARGIN) -> str:
    """Whether the claim ``kind`` about Δ = A - B holds, given its paired interval.

    ``"better"``: holds if the interval lies above 0, does not hold if it lies below 0. ``"on par"``: holds if the
    interval lies within ``±margin``, does not hold if it lies wholly outside it (an equivalence test).
    ``"not worse"``: holds if the interval lies above ``-margin``, does not hold if it lies below it
    (non-inferiority). Anything else is not shown at this scale; fewer than two pairs give ``diff.verdict``.
    """
    if kind not in CLAIM_KINDS:
        raise InvalidValue(f"kind must be one of {', '.join(map(repr, CLAIM_KINDS))}; got {kind!r}")
    if not margin > 0:
        raise InvalidValue(f"margin must be positive, got {margin}")
    if diff.low is None or diff.high is None:
        return diff.verdict
    low, high = diff.low, diff.high
    if kind == "better":
        holds, fails = low > 0, high < 0
    elif kind == "on par":
        holds, fails = -margin <= low and high <= margin, low > margin or high < -margin
    else:
        holds, fails = low >= -margin, high < -margin
    return HOLDS if holds else DOES_NOT_HOLD if fails else NOT_SHOWN
