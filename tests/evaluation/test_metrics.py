"""Metrics against hand-computed values and closed forms."""

import math

import numpy as np
import pytest
import torch

from oodpl.evaluation.metrics import (
    agreement_units,
    mean_ci95,
    pair_correct,
    rm_gold_agreement,
    sequence_kl_estimate,
    win_rate,
)
from oodpl.evaluation.stats import t_quantile


# ------------------------------------------------------------------------------------- pair accuracy (its units)
def test_pair_correct_near_tie_and_tensor_input():
    c = torch.tensor([1.0 + 1e-12, 5.0], dtype=torch.float64)
    r = np.array([1.0, 6.0])
    assert pair_correct(c, r) == [0.5, 0.0]


def test_pair_correct_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in length"):
        pair_correct([1, 2], [1])
    with pytest.raises(ValueError, match="non-finite"):
        pair_correct([float("nan")], [0.0])


# ---------------------------------------------------------------------------------------------------- win rate
def test_win_rate_hand_values_and_symmetry():
    a, b = [0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.5, 0.1]
    assert win_rate(a, b) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    assert win_rate([], []) is None


# ------------------------------------------------------------------------------------------------------ CI 95%
def test_t_quantiles_match_numerical_integration_of_the_t_density():
    def half_cdf(q, v):  # P(0 < T < q), Simpson's rule on the Student-t density
        x = np.linspace(0.0, q, 100001)
        c = math.exp(math.lgamma((v + 1) / 2) - math.lgamma(v / 2)) / math.sqrt(v * math.pi)
        f = c * (1 + x * x / v) ** (-(v + 1) / 2)
        h = x[1] - x[0]
        return h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    for v in (1, 2, 3, 5, 10, 29, 30, 31, 45, 100, 500):
        assert half_cdf(t_quantile(0.975, v), v) == pytest.approx(0.475, abs=1e-8), v
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_mean_ci95_two_values_closed_form():
    # mean 3, s = sqrt(2), s / sqrt(2) = 1  ->  half-width = t_{0.975,1} = 12.706204736
    ci = mean_ci95([2.0, 4.0])
    assert ci["n"] == 2
    assert ci["mean"] == pytest.approx(3.0)
    assert ci["low"] == pytest.approx(3.0 - 12.706204736)
    assert ci["high"] == pytest.approx(3.0 + 12.706204736)


def test_mean_ci95_five_values_closed_form():
    # 1..5: mean 3, s^2 = 2.5, s / sqrt(5) = sqrt(0.5); t_{0.975,4} = 2.776445105
    ci = mean_ci95([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert (ci["low"], ci["mean"], ci["high"]) == pytest.approx((3 - half, 3.0, 3 + half))


def test_mean_ci95_degenerate_sizes():
    assert mean_ci95([0.7]) == {"mean": 0.7, "low": None, "high": None, "n": 1}  # as stats.t_interval
    assert mean_ci95([]) == {"mean": None, "low": None, "high": None, "n": 0}
    ci = mean_ci95([5.0, 5.0, 5.0])
    assert ci["low"] == ci["high"] == 5.0


# ------------------------------------------------------------------------------------------ RM-gold agreement
def test_rm_gold_agreement_hand_example():
    # group "a" (positions 0, 2, 5): gold 1, 2, 3; rm 0.1, 0.3, 0.2
    #   pairs (1,2) agree, (1,3) agree, (2,3) disagree              -> 2 of 3
    # group "b" (positions 1, 4): gold 5, 5 -> gold tie, skipped
    # group "c" (position 3): a single sample, no pair
    # group "d" (positions 6, 7): gold 1 > 0, rm 7 = 7 -> RM tie, counts 0.5
    groups = ["a", "b", "a", "c", "b", "a", "d", "d"]
    gold = [1.0, 5.0, 2.0, 9.0, 5.0, 3.0, 1.0, 0.0]
    rm = [0.1, -1.0, 0.3, 0.0, 4.0, 0.2, 7.0, 7.0]
    assert rm_gold_agreement(rm, gold, groups) == pytest.approx((2 + 0.5) / 4)


def test_rm_gold_agreement_is_about_order_not_scale_and_only_within_groups():
    gold = [0.1, 0.2, 0.9, 0.8]
    rm = [-100.0, 50.0, 3.0, 2.0]  # same order as gold within each group, wildly different scale
    assert rm_gold_agreement(rm, gold, [0, 0, 1, 1]) == pytest.approx(1.0)
    assert rm_gold_agreement([-x for x in rm], gold, [0, 0, 1, 1]) == pytest.approx(0.0)
    # across groups nothing is compared
    assert rm_gold_agreement(rm, gold, [0, 1, 2, 3]) is None
    # all gold ties -> nothing comparable
    assert rm_gold_agreement([1, 2], [0.5, 0.5], ["p", "p"]) is None
    with pytest.raises(ValueError):
        rm_gold_agreement([1, 2], [1, 2], ["p"])


# ----------------------------------------------------------------------------------------------------- KL
def test_sequence_kl_estimate_is_mean_log_ratio():
    assert sequence_kl_estimate([-3.0, -2.0], [-4.0, -2.5]) == pytest.approx(0.75)  # (1 + 0.5) / 2
    # a single sample's term may be negative (k1 estimator); no clipping
    assert sequence_kl_estimate(torch.tensor([-5.0]), torch.tensor([-4.0])) == pytest.approx(-1.0)
    assert sequence_kl_estimate([], []) is None


def test_sequence_kl_estimate_is_unbiased_on_a_closed_form_case():
    # pi = N(1, 1), pi_ref = N(0, 1): KL = 1/2; samples from pi, log ratio = x - 1/2
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=200_000)
    lp, lr = -0.5 * (x - 1) ** 2, -0.5 * x**2
    assert sequence_kl_estimate(lp, lr) == pytest.approx(0.5, abs=0.01)


# ------------------------------------------------------------------------------------------ per-unit helpers
def test_pair_correct_units_average_to_pair_accuracy():
    # wins: 2>1, 1=1 (tie), 3<4, 0>-1  ->  pl_accuracy (1 + 0.5 + 0 + 1) / 4
    c, r = [2, 1, 3, 0], [1, 1, 4, -1]
    assert pair_correct(c, r) == [1.0, 0.5, 0.0, 1.0]
    assert np.mean(pair_correct(c, r)) == pytest.approx(0.625)
    assert pair_correct([], []) == []


def test_agreement_units_hand_example_and_pairing_across_rms():
    # the hand example of test_rm_gold_agreement_hand_example: prompt a -> pairs (0,2) agree, (0,5) agree,
    # (2,5) disagree; prompt b: gold tie, no unit; prompt c: one sample; prompt d: RM tie -> 0.5
    groups = ["a", "b", "a", "c", "b", "a", "d", "d"]
    gold = [1.0, 5.0, 2.0, 9.0, 5.0, 3.0, 1.0, 0.0]
    rm = [0.1, -1.0, 0.3, 0.0, 4.0, 0.2, 7.0, 7.0]
    vals, cl = agreement_units(rm, gold, groups)
    assert vals == [1.0, 1.0, 0.0, 0.5] and cl == ["a", "a", "a", "d"]
    assert np.mean(vals) == pytest.approx(rm_gold_agreement(rm, gold, groups))
    # another RM on the same samples gets the same pairs in the same order (paired units): reversed RM flips them
    vals2, cl2 = agreement_units([-x for x in rm], gold, groups)
    assert cl2 == cl and vals2 == [0.0, 0.0, 1.0, 0.5]
    assert agreement_units([1, 2], [0.5, 0.5], ["p", "p"]) == ([], [])
