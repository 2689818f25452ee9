"""visionmix.bench.stats: the t quantile, the paired t interval and the verdicts, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from visionmix.bench.stats import (
    BETTER,
    DOES_NOT_HOLD,
    HOLDS,
    NO_DIFFERENCE,
    NO_PAIRS,
    NOT_SHOWN,
    ON_PAR_MARGIN,
    ONE_SEED,
    WORSE,
    PairedDifference,
    claim_verdict,
    paired_difference,
    regularized_beta,
    t_quantile,
)

T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2); also the closed form below


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025, 0.3])
def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_matches_scipy_for_df_1_to_30():
    scipy_t = pytest.importorskip("scipy.stats").t
    for df in range(1, 31):
        for p in (0.5, 0.8, 0.95, 0.975, 0.995, 0.01):
            assert abs(t_quantile(p, df) - scipy_t.ppf(p, df)) < 1e-6, (p, df)
    assert t_quantile(0.975, 2) == pytest.approx(T_975_DF2, abs=1e-9)


def test_t_quantile_tends_to_the_normal_one_and_checks_its_arguments():
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, abs=1e-6)
    assert t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError, match="p must lie strictly between 0 and 1, got 1.0"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be positive, got 0"):
        t_quantile(0.9, 0)


def test_regularized_beta_known_values():
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)  # uniform
    assert regularized_beta(0.3, 2, 1) == pytest.approx(0.09)  # x^a for b = 1
    assert regularized_beta(0.8, 1, 3) == pytest.approx(1 - 0.2**3)  # 1 - (1-x)^b for a = 1
    assert regularized_beta(0.25, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(0.5))  # arcsine law
    assert (regularized_beta(0.0, 2, 3), regularized_beta(1.0, 2, 3)) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        regularized_beta(1.5, 1, 1)


def test_paired_interval_on_known_numbers():
    diff = paired_difference([91.0, 92.0, 93.0], [90.0, 90.0, 90.0])  # differences 1, 2, 3: mean 2, s = 1
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # 2.4841...
    assert diff.n == 3 and diff.mean == pytest.approx(2.0)
    assert (diff.low, diff.high) == (pytest.approx(2 - half, abs=1e-9), pytest.approx(2 + half, abs=1e-9))
    assert diff.verdict == NO_DIFFERENCE  # -0.484 < 0 < 4.484
    better = paired_difference([2.0, 2.5, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0])  # mean 2.375, s = 0.4787
    half = t_quantile(0.975, 3) * 0.47871355387816905 / 2
    assert better.low == pytest.approx(2.375 - half) and better.low > 0 and better.verdict == BETTER
    worse = paired_difference([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert (worse.mean, worse.verdict) == (pytest.approx(-2.0), NO_DIFFERENCE)
    clearly_worse = paired_difference([0.0, 0.0, 0.0], [5.0, 5.5, 6.0])
    assert clearly_worse.high < 0 and clearly_worse.verdict == WORSE


def test_a_wider_confidence_gives_a_wider_interval():
    narrow = paired_difference([1.0, 2.0, 3.0], [0, 0, 0], confidence=0.8)
    half = t_quantile(0.9, 2) / math.sqrt(3)
    assert (narrow.low, narrow.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert narrow.verdict == BETTER  # at 80% the interval [0.53, 3.47] excludes 0


def test_one_seed_and_no_seed_cannot_decide():
    one = paired_difference([91.5], [90.0])
    assert one == PairedDifference(1, 1.5, None, None, ONE_SEED) and one.verdict == "1 seed: cannot decide"
    assert paired_difference([], []) == PairedDifference(0, None, None, None, NO_PAIRS)


def test_paired_difference_checks_its_arguments():
    with pytest.raises(ValueError, match="values_a and values_b must pair up one to one, got 2 and 1"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1, got 95"):
        paired_difference([1.0, 2.0], [1.0, 1.0], confidence=95)


def _diff(low: float, high: float) -> PairedDifference:
    return PairedDifference(3, (low + high) / 2, low, high, "unused")


@pytest.mark.parametrize(("low", "high", "kind", "verdict"), [
    (0.2, 1.5, "better", HOLDS),
    (-1.5, -0.2, "better", DOES_NOT_HOLD),
    (-0.2, 1.5, "better", NOT_SHOWN),
    (-0.6, 0.8, "on par", HOLDS),  # within ±1 point
    (-ON_PAR_MARGIN, ON_PAR_MARGIN, "on par", HOLDS),  # the margin itself is on par
    (-0.3, 1.4, "on par", NOT_SHOWN),  # contains 0, but also differences above the margin
    (-2.5, 2.5, "on par", NOT_SHOWN),  # a wide interval shows nothing, even though it contains 0
    (1.2, 2.0, "on par", DOES_NOT_HOLD),  # clearly apart by more than the margin
    (-3.0, -1.1, "on par", DOES_NOT_HOLD),
    (-0.8, 0.4, "not worse", HOLDS),
    (-2.0, 0.4, "not worse", NOT_SHOWN),
    (-2.0, -1.2, "not worse", DOES_NOT_HOLD),
])
def test_claim_verdicts(low, high, kind, verdict):
    assert claim_verdict(_diff(low, high), kind) == verdict


def test_claim_verdict_with_one_seed_margin_and_bad_arguments():
    assert claim_verdict(paired_difference([91.0], [90.0]), "better") == ONE_SEED
    assert claim_verdict(paired_difference([], []), "on par") == NO_PAIRS
    assert claim_verdict(_diff(-1.5, 1.5), "on par", margin=2.0) == HOLDS
    with pytest.raises(ValueError, match="kind must be one of 'better', 'on par', 'not worse'; got 'beats'"):
        claim_verdict(_diff(0, 1), "beats")
    with pytest.raises(ValueError, match="margin must be positive, got 0"):
        claim_verdict(_diff(0, 1), "on par", margin=0)
