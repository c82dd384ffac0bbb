"""Statistics of the benchmark's evidence (docs/method.md, "Statistics and evidence"): pure functions, numpy/math only.

* Student-t quantiles exactly (regularized incomplete beta by continued fraction, inverted by bisection), t-intervals,
  the exact two-sided sign test.
* Prompt-clustered percentile bootstrap within a (seed, domain) cell: samples of one prompt are not independent, so
  whole prompts are resampled.
* Gold reward at matched KL: linear interpolation on a frontier (never extrapolated).
* `paired_comparison`: the paired difference of a method to a baseline per (seed, held-out domain) cell, a 95%
  t-interval over seeds of the domain-averaged difference (this alone decides the verdict) and a sign test over
  cells beside it; `verdict_sentence` states the result in one plain sentence, losses as plainly as wins.

Inputs are read as float64; non-finite values raise ValueError (a NaN compared with > is silently False). A figure
that cannot be computed is None, never a made-up number.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from oodpl.core.objectives import TIE_TOL


PRIMARY = ("pl_accuracy", "rm_gold_agreement")
SECONDARY = ("gold_at_matched_kl", "win_rate_vs_reference", "win_rate_vs_erm")
DESCRIPTIVE = ("gold_reward", "kl", "own_sample_agreement")

METRIC_LABELS = {
    "pl_accuracy": "held-out PL accuracy",
    "rm_gold_agreement": "RM-gold agreement on shared pi_ref samples",
    "gold_at_matched_kl": "gold reward at matched KL",
    "win_rate_vs_reference": "win rate against the reference policy",
    "win_rate_vs_erm": "win rate against erm-rm",
    "gold_reward": "gold reward at the first beta_test",
    "kl": "KL to pi_ref at the first beta_test",
    "own_sample_agreement": "RM-gold agreement on the method's own samples",
}


def endpoint_kind(metric: str) -> str:
    """'primary', 'secondary' or 'descriptive' (any metric not fixed as an endpoint)."""
    if metric in PRIMARY:
        return "primary"
    if metric in SECONDARY:
        return "secondary"
    return "descriptive"


def as_1d(x: Any, name: str) -> np.ndarray:
    """A 1-D float64 array from a sequence, numpy array or torch tensor; ValueError on NaN/inf or more dimensions."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return a


# ------------------------------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes 6.4."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b); pass y = 1 - x when it is known more precisely."""
    y = 1.0 - x if y is None else y
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df > 0 degrees of freedom (df = inf: the standard normal)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))  # P(|T| > |t|) / 2
    return tail if t >= 0 else 1.0 - tail


_LARGE_DF = 1e5


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df > 0 degrees of freedom (df = inf: the standard normal), 0 < p < 1.

    Exact up to float rounding: the upper tail P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2 is inverted by bisection
    (relative tolerance 1e-14); for df >= 1e5 the Cornish-Fisher expansion around the normal quantile.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if _LARGE_DF <= df < math.inf:
        # lgamma(df/2) ~ 1e6+ loses absolute precision here; the Cornish-Fisher expansion around the normal quantile
        # (Abramowitz & Stegun 26.7.5) has error O(df^-5) < 1e-24 instead.
        z, v = t_quantile(p, math.inf), float(df)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4
    target = 1.0 - p  # find t > 0 with P(T > t) = target
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > target:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ArithmeticError(f"t_quantile({p}, {df}) is out of floating-point range")
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return 0.5 * (lo + hi)


def t_interval(values: Any, conf: float = 0.95) -> dict:
    """Mean with a two-sided `conf` Student-t interval, mean +- t_{(1+conf)/2, n-1} * sd / sqrt(n) (sd: ddof=1).

    Returns {"mean", "low", "high", "n", "sd"}; n < 2: low/high/sd None (no spread can be estimated); n = 0: mean None.
    """
    a = as_1d(values, "values")
    n = int(a.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "sd": None}
    mean = float(a.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "sd": None}
    sd = float(a.std(ddof=1))
    half = t_quantile(0.5 + conf / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


# ------------------------------------------------------------------------------------------------- sign test
def sign_test(diffs: Any) -> dict:
    """Exact two-sided sign test of H0: a difference is as likely positive as negative.

    Ties (|d| < TIE_TOL) are dropped; with k = min(positive, negative) of n = positive + negative,
    p = min(1, 2 * sum_{i <= k} C(n, i) / 2^n). Returns {"positive", "negative", "ties", "n", "p"}; p None when n = 0.
    """
    d = as_1d(diffs, "diffs")
    ties = int((np.abs(d) < TIE_TOL).sum())
    pos = int((d >= TIE_TOL).sum())
    neg = int((d <= -TIE_TOL).sum())
    n = pos + neg
    p = None
    if n:
        k = min(pos, neg)
        p = min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)
    return {"positive": pos, "negative": neg, "ties": ties, "n": n, "p": p}


# ------------------------------------------------------------------------------------------ cluster bootstrap
def cluster_bootstrap(values: Any, clusters: Sequence[Any], n_boot: int = 2000, seed: int = 0,
                      conf: float = 0.95) -> dict:
    """Percentile bootstrap interval of the mean over units, resampling whole clusters (prompts) with replacement.

    Each replicate draws as many clusters as there are, with replacement, and takes the mean over all units of the
    drawn clusters (so a cluster counts with its size). Deterministic given `seed`. Returns {"mean", "low", "high",
    "units", "clusters"}: mean = the plain mean over units; low/high None with fewer than 2 clusters (no spread
    between prompts can be estimated); everything None without units.
    """
    v = as_1d(values, "values")
    cl = list(clusters)
    if len(cl) != v.size:
        raise ValueError(f"values and clusters differ in length ({v.size} vs {len(cl)})")
    if v.size == 0:
        return {"mean": None, "low": None, "high": None, "units": 0, "clusters": 0}
    index: dict[Any, int] = {}
    ids = np.fromiter((index.setdefault(c, len(index)) for c in cl), dtype=np.int64, count=len(cl))
    c = len(index)
    sums = np.bincount(ids, weights=v, minlength=c)
    sizes = np.bincount(ids, minlength=c).astype(np.float64)
    out = {"mean": float(v.mean()), "low": None, "high": None, "units": int(v.size), "clusters": c}
    if c < 2:
        return out
    draws = np.random.default_rng(seed).integers(0, c, size=(n_boot, c))
    stats = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    alpha = 1.0 - conf
    lo, hi = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    out["low"], out["high"] = float(lo), float(hi)
    return out


def paired_cluster_bootstrap(a: Any, b: Any, clusters: Sequence[Any], n_boot: int = 2000, seed: int = 0,
                             conf: float = 0.95) -> dict:
    """`cluster_bootstrap` of the per-unit differences a - b (a and b score the same units in the same order)."""
    x, y = as_1d(a, "a"), as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b differ in length ({x.size} vs {y.size}): the units are not paired")
    return cluster_bootstrap(x - y, clusters, n_boot=n_boot, seed=seed, conf=conf)


# ------------------------------------------------------------------------------------------------ matched KL
def _frontier_xy(points: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(kl, gold) sorted by KL, points with a None coordinate dropped, equal KLs averaged."""
    pairs = []
    for p in points:
        kl, gold = (p.get("kl"), p.get("gold_reward")) if isinstance(p, dict) else (p[0], p[1])
        if kl is None or gold is None:
            continue
        kl, gold = float(kl), float(gold)
        if not (math.isfinite(kl) and math.isfinite(gold)):
            raise ValueError(f"frontier point with a non-finite value: kl={kl}, gold_reward={gold}")
        pairs.append((kl, gold))
    if not pairs:
        return np.zeros(0), np.zeros(0)
    kls = np.array(sorted({k for k, _ in pairs}))
    golds = np.array([np.mean([g for k, g in pairs if k == x]) for x in kls])
    return kls, golds


def interpolate_at_kl(points: Iterable[Any], target: float | None) -> float | None:
    """Gold reward at KL = target, linearly interpolated on a frontier (dicts with "kl" and "gold_reward", or
    (kl, gold) pairs, any order). None when target lies outside the frontier's KL range (never extrapolated), when
    target is None, or when no point has both coordinates."""
    if target is None:
        return None
    kls, golds = _frontier_xy(points)
    if kls.size == 0 or not kls[0] <= target <= kls[-1]:
        return None
    return float(np.interp(target, kls, golds))


def matched_kl(frontier_a: Iterable[Any], frontier_b: Iterable[Any], *more: Iterable[Any]) -> float | None:
    """A KL that every given frontier covers: the middle of the overlap of their KL ranges; None without overlap."""
    lo, hi = -math.inf, math.inf
    for f in (frontier_a, frontier_b, *more):
        kls, _ = _frontier_xy(f)
        if kls.size == 0:
            return None
        lo, hi = max(lo, float(kls[0])), min(hi, float(kls[-1]))
    if lo > hi:
        return None
    return 0.5 * (lo + hi)


def gold_at_matched_kl(frontiers: dict[str, list], competing: Iterable[str], origin: list | None = None
                       ) -> tuple[float | None, dict[str, float | None]]:
    """One cell's matched KL and every frontier's gold reward there: the KL is matched_kl of the `competing`
    frontiers, each read by interpolate_at_kl. `origin`: pi_ref's point (KL 0, its gold reward on the same
    evaluation prompts), where every meta-test starts (beta_test -> infinity), put at the start of each frontier: two
    beta_test values that leave frontiers short and apart then still share the range [0, the smallest reach]."""
    origin = list(origin or [])
    anchored = {m: origin + list(f) for m, f in frontiers.items()}
    competitors = [anchored[m] for m in competing]
    target = matched_kl(*competitors) if len(competitors) >= 2 else None
    return target, {m: interpolate_at_kl(f, target) for m, f in anchored.items()}


# ------------------------------------------------------------------------------------------ paired comparison
def _cell_values(cells: Iterable[dict], metric: str, method: str) -> dict[tuple, float]:
    out = {}
    for c in cells:
        if c.get("method") != method:
            continue
        v = (c.get("metrics") or {}).get(metric)
        if v is None:
            continue
        key = (c["seed"], c["domain"])
        if key in out:
            raise ValueError(f"two cells for seed {c['seed']}, domain {c['domain']}, method {method}")
        out[key] = float(v)
    return out


_NOISE = 1e-12  # below this a difference of means is floating-point rounding (0.5 - 0.5 computed two ways), not data


def paired_comparison(cells: Iterable[dict], metric: str, method: str, baseline: str, conf: float = 0.95,
                      alpha: float = 0.05) -> dict:
    """Paired difference method - baseline of one metric over the (seed, domain) cells where both have it.

    Returns {"metric", "method", "baseline", "n_cells", "n_seeds", "n_domains", "per_cell": [{"seed", "domain",
    "method", "baseline", "diff"}], "mean_diff" (over cells), "method_mean", "baseline_mean" (over the same cells),
    "per_seed": {seed: domain-averaged diff}, "t": t_interval over seeds of those, "sign": sign_test over cells,
    "verdict", "sign_verdict", "tests_agree"}.

    verdict is decided by the t-interval alone: "higher" / "lower" when it lies above / below 0, "no significant
    difference" when it contains 0, "not enough data" with fewer than 2 seeds. sign_verdict is the sign test's own
    reading at level alpha ("higher" / "lower" / "no significant difference" / "not enough data" without untied
    cells); tests_agree says whether the two readings agree (None when either lacks data). When every seed has the
    same non-zero difference (`t_no_width`: a discrete count, e.g. one more of 24 pairs in every seed) the t-interval
    has no width and measures no uncertainty, so the sign test decides: verdict = sign_verdict (no significant
    difference where it has no untied cell) and tests_agree is None.
    """
    cells = list(cells)
    a, b = _cell_values(cells, metric, method), _cell_values(cells, metric, baseline)
    keys = sorted(set(a) & set(b), key=lambda k: (k[0], str(k[1])))
    per_cell = [{"seed": s, "domain": d, "method": a[(s, d)], "baseline": b[(s, d)], "diff": a[(s, d)] - b[(s, d)]}
                for s, d in keys]
    by_seed: dict[Any, list[float]] = {}
    for r in per_cell:
        by_seed.setdefault(r["seed"], []).append(r["diff"])
    per_seed = {s: float(np.mean(v)) for s, v in by_seed.items()}
    t = t_interval(list(per_seed.values()), conf=conf)
    sign = sign_test([r["diff"] for r in per_cell])
    if sign["p"] is None:
        sign_verdict = "not enough data"
    elif sign["p"] < alpha:
        sign_verdict = "higher" if sign["positive"] > sign["negative"] else "lower"
    else:
        sign_verdict = "no significant difference"
    no_width = t["low"] is not None and t["sd"] <= _NOISE * max(1.0, abs(t["mean"])) and abs(t["mean"]) > _NOISE
    if t["low"] is None:
        verdict = "not enough data"
    elif no_width:
        verdict = "no significant difference" if sign_verdict == "not enough data" else sign_verdict
    elif t["low"] > 0:
        verdict = "higher"
    elif t["high"] < 0:
        verdict = "lower"
    else:
        verdict = "no significant difference"
    agree = None if no_width or "not enough data" in (verdict, sign_verdict) else verdict == sign_verdict
    mean = (lambda xs: float(np.mean(xs)) if xs else None)
    return {
        "metric": metric, "method": method, "baseline": baseline, "conf": conf,
        "n_cells": len(per_cell), "n_seeds": len(per_seed), "n_domains": len({d for _, d in keys}),
        "per_cell": per_cell, "mean_diff": mean([r["diff"] for r in per_cell]),
        "method_mean": mean([r["method"] for r in per_cell]), "baseline_mean": mean([r["baseline"] for r in per_cell]),
        "per_seed": per_seed, "t": t, "sign": sign,
        "verdict": verdict, "sign_verdict": sign_verdict, "tests_agree": agree, "t_no_width": no_width,
    }


def fmt_num(x: float | None, digits: int = 3) -> str:
    """A number for a table or sentence: `digits` decimals, two significant digits when smaller (rounding noise below
    _NOISE is 0); None -> n/a."""
    if x is None:
        return "n/a"
    if abs(x) < _NOISE:
        x = 0.0
    if x != 0 and abs(x) < 0.5 * 10**-digits:
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def fmt_signed(x: float | None, digits: int = 3) -> str:
    """fmt_num with its sign: +0.012, -0.004, +0.000 for 0 and for rounding noise of either sign; None -> n/a."""
    if x is None:
        return "n/a"
    return ("" if x < 0 and abs(x) >= _NOISE else "+") + fmt_num(x, digits)


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def verdict_sentence(comp: dict, label: str | None = None) -> str:
    """One plain English sentence from a `paired_comparison` result (losses stated as plainly as wins).

    The difference stated is the centre of the t-interval (the mean over seeds of the domain-averaged differences;
    equal to the mean over cells when every seed has the same domains)."""
    metric, m, b = comp["metric"], comp["method"], comp["baseline"]
    kind = endpoint_kind(metric)
    what = label or METRIC_LABELS.get(metric, metric)
    head = f"On {what} ({kind}), "
    if comp["n_cells"] == 0:
        return head + f"{m} and {b} cannot be compared: no (seed, domain) cell has both."
    t, s = comp["t"], comp["sign"]
    pct = f"{100 * comp.get('conf', 0.95):g}%"
    cells = f"{comp['n_cells']} cell{'s' if comp['n_cells'] != 1 else ''}"
    sign = f"sign test {s['positive']}/{s['n']} cells higher, p = {fmt_p(s['p'])}"
    if s["ties"]:
        sign += f", {s['ties']} tied"
    if comp["verdict"] == "not enough data":
        return head + (f"{m} and {b} cannot be tested: the {cells} come from {comp['n_seeds']} seed, and a "
                       f"t-interval over seeds needs at least 2 (mean difference {fmt_num(comp['mean_diff'])}; "
                       f"{sign}).")
    interval = (f"{pct} t-interval over {comp['n_seeds']} seeds [{fmt_num(t['low'])}, {fmt_num(t['high'])}]; "
                f"{sign}; {cells}")
    if comp.get("t_no_width"):  # every seed the same difference: the sign test decides (paired_comparison)
        interval = (f"the t-interval over {comp['n_seeds']} seeds has no width, every seed's domain-averaged "
                    f"difference being the same, so the sign test decides: {sign}; {cells}")
    disagree = "" if comp["tests_agree"] is not False else \
        f" The sign test reads it differently ({comp['sign_verdict']})."
    if comp["verdict"] in ("higher", "lower"):
        return (head + f"{m} is {comp['verdict']} than {b} by {fmt_num(abs(t['mean']))} "
                f"({interval})." + disagree)
    return (head + f"{m} shows no significant difference from {b} (mean difference "
            f"{fmt_signed(t['mean'])}, {interval})." + disagree)
