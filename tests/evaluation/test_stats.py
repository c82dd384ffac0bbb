"""Statistics of the evidence against known values, hand-computed sums and constructed data with a known answer."""

import math

import numpy as np
import pytest

from oodpl.evaluation.stats import (
    betainc,
    cluster_bootstrap,
    fmt_num,
    interpolate_at_kl,
    matched_kl,
    paired_cluster_bootstrap,
    paired_comparison,
    sign_test,
    t_interval,
    t_quantile,
    t_sf,
    verdict_sentence,
)


# ------------------------------------------------------------------------------------------------- Student t
@pytest.mark.parametrize("df, q", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281),
                                   (30, 2.0423), (120, 1.9799), (10**7, 1.95996), (math.inf, 1.95996)])
def test_t_quantile_975_known_values(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=6e-5)


def test_t_quantile_other_levels_and_symmetry():
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    assert t_quantile(0.995, 3) == pytest.approx(5.8409, abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)  # Cauchy: exact
    # df = 2 closed form: t_p = (2p - 1) sqrt(2 / (4 p (1 - p)))
    p = 0.9
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-12)
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7), rel=1e-14)
    assert t_quantile(0.5, 3) == 0.0
    assert t_sf(t_quantile(0.99, 6.5), 6.5) == pytest.approx(0.01, rel=1e-10)  # fractional df
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_betainc_closed_forms():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(2, 1, 0.3) == pytest.approx(0.09)  # x^a when b = 1
    assert betainc(1, 3, 0.2) == pytest.approx(1 - 0.8**3)  # 1 - (1-x)^b when a = 1
    assert betainc(2.5, 4, 0.0) == 0.0 and betainc(2.5, 4, 1.0) == 1.0


def test_t_interval_closed_form_and_degenerate_sizes():
    ci = t_interval([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)  # s^2 = 2.5, s / sqrt(5) = sqrt(0.5)
    assert (ci["low"], ci["mean"], ci["high"]) == pytest.approx((3 - half, 3.0, 3 + half))
    assert ci["n"] == 5 and ci["sd"] == pytest.approx(math.sqrt(2.5))
    assert t_interval([0.4]) == {"mean": 0.4, "low": None, "high": None, "n": 1, "sd": None}
    assert t_interval([]) == {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    narrower = t_interval([1, 2, 3, 4, 5], conf=0.9)
    assert ci["low"] < narrower["low"] < narrower["high"] < ci["high"]
    with pytest.raises(ValueError, match="non-finite"):
        t_interval([1.0, float("nan")])


# ------------------------------------------------------------------------------------------------- sign test
def test_sign_test_hand_computed_binomial_sums():
    # 8 of 9 positive: 2 * (C(9,0) + C(9,1)) / 2^9 = 20 / 512
    out = sign_test([1, 2, 3, 4, 5, 6, 7, 8, -1])
    assert out == {"positive": 8, "negative": 1, "ties": 0, "n": 9, "p": pytest.approx(20 / 512)}
    # 2 of 6 negative, one tie dropped: 2 * (1 + 6 + 15) / 64 = 44 / 64
    out = sign_test([0.1, 0.2, 0.3, 0.4, -0.1, -0.2, 0.0])
    assert (out["positive"], out["negative"], out["ties"], out["n"]) == (4, 2, 1, 6)
    assert out["p"] == pytest.approx(44 / 64)
    assert sign_test([1, -1])["p"] == 1.0  # capped at 1
    assert sign_test([1] * 5)["p"] == pytest.approx(2 / 32)
    assert sign_test([0.0, 1e-12])["p"] is None  # all ties: nothing to test


# ------------------------------------------------------------------------------------------ cluster bootstrap
def test_cluster_bootstrap_is_deterministic_and_centred_on_the_mean():
    rng = np.random.default_rng(3)
    v, cl = rng.normal(size=60), np.repeat(np.arange(12), 5)
    a, b = cluster_bootstrap(v, cl, seed=7), cluster_bootstrap(v, cl, seed=7)
    assert a == b
    assert a["mean"] == pytest.approx(v.mean())
    assert a["low"] < a["mean"] < a["high"]
    assert (a["units"], a["clusters"]) == (60, 12)
    assert cluster_bootstrap(v, cl, seed=8) != a  # the seed matters


def test_cluster_bootstrap_resamples_clusters_as_wholes():
    # All variance between clusters: 10 prompts, each with 20 identical samples. Treating the 200 samples as
    # independent units (each its own cluster) understates the uncertainty; the clustered interval is much wider.
    rng = np.random.default_rng(0)
    per_prompt = rng.normal(size=10)
    v, cl = np.repeat(per_prompt, 20), np.repeat(np.arange(10), 20)
    clustered = cluster_bootstrap(v, cl, seed=0)
    independent = cluster_bootstrap(v, np.arange(200), seed=0)
    assert clustered["high"] - clustered["low"] > 3 * (independent["high"] - independent["low"])
    # the clustered interval agrees with a t-interval over the 10 prompt means (roughly; bootstrap is a bit narrower)
    t = t_interval(per_prompt)
    assert clustered["high"] - clustered["low"] == pytest.approx(t["high"] - t["low"], rel=0.35)


def test_cluster_bootstrap_weights_clusters_by_size_and_degenerate_inputs():
    # one big cluster of 1s and one small cluster of 0s: every replicate's mean is a units-weighted mean
    v = [1.0] * 9 + [0.0]
    out = cluster_bootstrap(v, ["a"] * 9 + ["b"], n_boot=500)
    assert out["mean"] == pytest.approx(0.9)
    assert out["low"] == pytest.approx(0.0) or out["low"] >= 0.0
    assert out["high"] == pytest.approx(1.0)
    assert cluster_bootstrap([0.2, 0.4], ["p", "p"]) == \
        {"mean": pytest.approx(0.3), "low": None, "high": None, "units": 2, "clusters": 1}
    assert cluster_bootstrap([], [])["mean"] is None
    with pytest.raises(ValueError, match="differ in length"):
        cluster_bootstrap([1.0, 2.0], [0])


def test_paired_cluster_bootstrap_is_the_bootstrap_of_differences():
    rng = np.random.default_rng(1)
    a, cl = rng.normal(size=40), np.repeat(np.arange(8), 5)
    b = a - 0.3 + 0.01 * rng.normal(size=40)  # a beats b by 0.3 on every unit, with tiny noise
    out = paired_cluster_bootstrap(a, b, cl, seed=2)
    assert out == cluster_bootstrap(a - b, cl, seed=2)
    assert 0.28 < out["low"] < out["mean"] < out["high"] < 0.32  # pairing removes the large between-unit spread
    with pytest.raises(ValueError, match="not paired"):
        paired_cluster_bootstrap([1, 2], [1], [0, 0])


# ------------------------------------------------------------------------------------------------ matched KL
def test_interpolate_at_kl_exact_on_linear_data_and_none_outside():
    pts = [{"beta": b, "kl": kl, "gold_reward": 0.5 + 2.0 * kl} for b, kl in ((0.5, 0.1), (0.05, 0.9), (0.2, 0.4))]
    for target in (0.1, 0.25, 0.4, 0.77, 0.9):
        assert interpolate_at_kl(pts, target) == pytest.approx(0.5 + 2.0 * target)
    assert interpolate_at_kl(pts, 0.05) is None and interpolate_at_kl(pts, 0.95) is None  # never extrapolate
    assert interpolate_at_kl(pts, None) is None
    assert interpolate_at_kl([(0.3, 1.0)], 0.3) == 1.0 and interpolate_at_kl([(0.3, 1.0)], 0.31) is None
    assert interpolate_at_kl([{"kl": None, "gold_reward": 1.0}], 0.0) is None


def test_matched_kl_is_inside_every_frontier_and_none_without_overlap():
    a = [(0.1, 0.0), (0.5, 1.0)]
    b = [(0.3, 0.0), (0.9, 1.0)]
    assert matched_kl(a, b) == pytest.approx(0.4)
    assert matched_kl(a, b, [(0.2, 0.0), (0.35, 0.0)]) == pytest.approx(0.325)
    assert matched_kl(a, [(0.6, 0.0), (0.8, 0.0)]) is None
    assert matched_kl(a, []) is None
    assert interpolate_at_kl(a, matched_kl(a, b)) is not None and interpolate_at_kl(b, matched_kl(a, b)) is not None


# ------------------------------------------------------------------------------------------ paired comparison
def _cells(effects, metric="pl_accuracy"):
    """effects[(seed, domain)] = meta-rm minus erm-rm; erm-rm's value varies by cell so differences must be paired."""
    cells = []
    for (s, d), e in effects.items():
        base = 0.5 + 0.1 * s + 0.03 * d
        cells.append({"seed": s, "domain": f"d{d}", "method": "erm-rm", "metrics": {metric: base}})
        cells.append({"seed": s, "domain": f"d{d}", "method": "meta-rm", "metrics": {metric: base + e}})
    return cells


def test_paired_comparison_known_answer():
    # seed 0: diffs 0.01, 0.02, 0.03 (mean 0.02); seed 1: 0.03, 0.04, 0.05 (0.04); seed 2: -0.01, 0.06, 0.05 (0.0333)
    eff = {(0, 0): 0.01, (0, 1): 0.02, (0, 2): 0.03, (1, 0): 0.03, (1, 1): 0.04, (1, 2): 0.05,
           (2, 0): -0.01, (2, 1): 0.06, (2, 2): 0.05}
    cells = _cells(eff) + [{"seed": 0, "domain": "d0", "method": "dpo", "metrics": {"pl_accuracy": 0.9}}]
    out = paired_comparison(cells, "pl_accuracy", "meta-rm", "erm-rm")
    seed_means = [0.02, 0.04, 0.1 / 3]
    m = np.mean(seed_means)
    half = 4.302652730 * np.std(seed_means, ddof=1) / math.sqrt(3)
    assert (out["n_cells"], out["n_seeds"], out["n_domains"]) == (9, 3, 3)
    assert out["mean_diff"] == pytest.approx(np.mean(list(eff.values())))
    assert out["per_seed"] == pytest.approx({0: 0.02, 1: 0.04, 2: 0.1 / 3})
    assert (out["t"]["low"], out["t"]["mean"], out["t"]["high"]) == pytest.approx((m - half, m, m + half))
    assert out["verdict"] == "higher"  # the interval [0.0058, 0.0564] lies above 0
    assert (out["sign"]["positive"], out["sign"]["negative"], out["sign"]["n"]) == (8, 1, 9)
    assert out["sign"]["p"] == pytest.approx(20 / 512)
    assert out["sign_verdict"] == "higher" and out["tests_agree"] is True
    s = verdict_sentence(out)
    assert s.startswith("On held-out PL accuracy (primary), meta-rm is higher than erm-rm by 0.031 ")
    assert "over 3 seeds [0.006, 0.056]" in s and "8/9 cells higher, p = 0.039" in s


def test_paired_comparison_lower_no_difference_and_not_enough_data():
    eff = {(s, d): -0.05 - 0.01 * s for s in range(3) for d in range(3)}
    out = paired_comparison(_cells(eff), "pl_accuracy", "meta-rm", "erm-rm")
    assert out["verdict"] == "lower" and out["sign"]["negative"] == 9
    assert "meta-rm is lower than erm-rm by 0.060" in verdict_sentence(out)

    eff = {(0, 0): 0.1, (0, 1): -0.1, (1, 0): 0.05, (1, 1): -0.04, (2, 0): -0.02, (2, 1): 0.01}
    out = paired_comparison(_cells(eff, "rm_gold_agreement"), "rm_gold_agreement", "meta-rm", "erm-rm")
    assert out["verdict"] == "no significant difference" and out["tests_agree"] is True
    assert out["t"]["low"] < 0 < out["t"]["high"]
    assert "meta-rm shows no significant difference from erm-rm" in verdict_sentence(out)

    out = paired_comparison(_cells({(0, 0): 0.1, (0, 1): 0.2}), "pl_accuracy", "meta-rm", "erm-rm")
    assert out["verdict"] == "not enough data" and out["n_seeds"] == 1 and out["tests_agree"] is None
    assert "cannot be tested" in verdict_sentence(out)
    out = paired_comparison(_cells(eff), "pl_accuracy", "meta-rm", "oracle-rm")
    assert out["n_cells"] == 0 and "cannot be compared" in verdict_sentence(out)


def test_paired_comparison_skips_cells_without_the_metric_and_flags_disagreeing_tests():
    # The t-interval over seeds is decisive (every seed is clearly higher) but with 4 cells the sign test cannot be
    # (smallest two-sided p = 2/16): the sentence must say the tests disagree.
    eff = {(0, 0): 0.10, (0, 1): 0.11, (1, 0): 0.10, (1, 1): 0.105}
    cells = _cells(eff)
    cells.append({"seed": 2, "domain": "d0", "method": "meta-rm", "metrics": {"pl_accuracy": 0.7}})  # no baseline
    cells.append({"seed": 2, "domain": "d0", "method": "erm-rm", "metrics": {"pl_accuracy": None}})
    out = paired_comparison(cells, "pl_accuracy", "meta-rm", "erm-rm")
    assert out["n_cells"] == 4 and out["n_seeds"] == 2
    assert out["verdict"] == "higher" and out["sign_verdict"] == "no significant difference"
    assert out["tests_agree"] is False
    assert "The sign test reads it differently" in verdict_sentence(out)
    with pytest.raises(ValueError, match="two cells"):
        paired_comparison(cells + cells[:1], "pl_accuracy", "meta-rm", "erm-rm")


def test_paired_comparison_without_spread_over_seeds_is_decided_by_the_sign_test():
    # The knowledge grm report's case: 24 pairs a domain, and in every seed exactly one more pair ranked right in one
    # of the 3 domains: each seed's domain-averaged difference is 1/72 and the t-interval [1/72, 1/72] has no width.
    # It measures no uncertainty, so it must not read "higher": the sign test (3/3 untied cells, p = 0.25) decides.
    eff = {(s, d): (1 / 24 if d == s else 0.0) for s in range(3) for d in range(3)}
    out = paired_comparison(_cells(eff), "pl_accuracy", "meta-rm", "erm-rm")
    assert out["t"]["sd"] < 1e-15 and out["t"]["low"] == pytest.approx(1 / 72) and out["t_no_width"]
    assert out["verdict"] == out["sign_verdict"] == "no significant difference" and out["tests_agree"] is None
    text = verdict_sentence(out)
    assert "meta-rm shows no significant difference from erm-rm (mean difference +0.014, the t-interval over 3 " \
           "seeds has no width" in text and "sign test 3/3 cells higher, p = 0.25, 6 tied" in text
    assert "reads it differently" not in text
    # the same difference in all 9 cells: the sign test is decisive (9/9, p = 0.0039)
    out = paired_comparison(_cells({(s, d): 0.02 for s in range(3) for d in range(3)}), "pl_accuracy", "meta-rm",
                            "erm-rm")
    assert out["t_no_width"] and out["verdict"] == "higher"
    assert verdict_sentence(out).startswith("On held-out PL accuracy (primary), meta-rm is higher than erm-rm by 0.020")
    # zero spread at zero difference (every cell tied) is no difference, read off the t-interval [0, 0] as before
    out = paired_comparison(_cells({(s, d): 0.0 for s in range(3) for d in range(3)}), "pl_accuracy", "meta-rm",
                            "erm-rm")
    assert out["verdict"] == "no significant difference" and not out["t_no_width"]
    # a difference of means that is only rounding noise prints as 0, not as +6.9e-18
    assert fmt_num(6.9e-18) == "0.000" and fmt_num(-3e-13) == "0.000" and fmt_num(2e-5) == "2e-05"


def test_gold_at_matched_kl_starts_every_frontier_at_pi_ref():
    """Two beta_test values that leave the frontiers short and apart: no shared KL without pi_ref's point; with it
    the matched KL is the middle of [0, the smallest reach] and each gold reward is read on its own anchored line."""
    from oodpl.evaluation.stats import gold_at_matched_kl

    a, b = [(0.3, 0.1), (0.4, 0.2)], [(0.1, 0.0), (0.2, 0.05)]
    target, at = gold_at_matched_kl({"a": a, "b": b}, ["a", "b"])
    assert target is None and at == {"a": None, "b": None}
    target, at = gold_at_matched_kl({"a": a, "b": b, "upper": [(0.05, 0.9)]}, ["a", "b"], origin=[(0.0, 0.02)])
    assert target == pytest.approx(0.1)  # 0.5 * min(0.4, 0.2)
    assert at["a"] == pytest.approx(0.02 + (0.1 - 0.0) / 0.3 * (0.1 - 0.02))  # between pi_ref and a's first point
    assert at["b"] == pytest.approx(0.0)  # b's own point at 0.1
    assert at["upper"] is None  # not a competitor: read only where its own frontier covers the KL (0.1 > 0.05)
    assert gold_at_matched_kl({"a": a}, ["a"], origin=[(0.0, 0.02)])[0] is None  # one competitor: nothing to match
