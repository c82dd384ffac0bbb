"""Evaluation metrics: pure functions, numbers in and numbers out (see docs/method.md, "Metrics").

Conventions shared by every function here:

* Inputs may be Python sequences, numpy arrays or torch tensors (1-D); they are read as float64.
* A tie is two scores whose absolute difference is below ``TIE_TOL`` (1e-9); a tie counts one half wherever a
  comparison is turned into a rate (pair accuracy, win rate, RM-gold agreement).
* A metric that does not apply (no samples, no comparable pairs) is ``None``, never a made-up number.
* Non-finite inputs (NaN, +-inf) raise ``ValueError``: a NaN compared with ``>`` is silently False and would
  quietly lower a rate, so it is refused instead. Mismatched lengths raise ``ValueError`` too (a caller bug).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from oodpl.core.objectives import TIE_TOL
from oodpl.evaluation.stats import t_interval
from oodpl.evaluation.stats import as_1d as _as_1d


def _pair(a: Any, b: Any, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_1d(a, name_a), _as_1d(b, name_b)
    if x.shape != y.shape:
        raise ValueError(f"{name_a} and {name_b} differ in length ({len(x)} vs {len(y)})")
    return x, y


def _outcomes(diff: np.ndarray) -> np.ndarray:
    """1 where diff > 0, 0.5 where |diff| < TIE_TOL, 0 where diff < 0."""
    out = np.where(diff > 0, 1.0, 0.0)
    out[np.abs(diff) < TIE_TOL] = 0.5
    return out


def win_rate(scores_a: Any, scores_b: Any) -> float | None:
    """Fraction of prompts where a's gold score beats b's (same prompt, same index); ties count one half.

    None when there are no prompts.
    """
    a, b = _pair(scores_a, scores_b, "scores_a", "scores_b")
    if a.size == 0:
        return None
    return float(_outcomes(a - b).mean())


def mean_ci95(values: Any) -> dict:
    """Mean with a two-sided 95% Student-t interval: stats.t_interval (the one interval of oodpl), without its sd.

    n = 1 has no interval (low/high None: no spread can be estimated); n = 0 has no mean either.
    Returns {"mean", "low", "high", "n"}."""
    ci = t_interval(values, conf=0.95)
    return {k: ci[k] for k in ("mean", "low", "high", "n")}


def pair_correct(chosen_scores: Any, rejected_scores: Any) -> list[float]:
    """Per preference pair: 1 if score(chosen) > score(rejected), 0.5 on a tie, 0 otherwise (pl_accuracy's units)."""
    c, r = _pair(chosen_scores, rejected_scores, "chosen_scores", "rejected_scores")
    return _outcomes(c - r).tolist()


def agreement_units(rm_scores: Any, gold_scores: Any, prompts: Sequence[Any]) -> tuple[list[float], list[Any]]:
    """The units of `rm_gold_agreement`: every unordered within-prompt pair (i < j) of samples whose gold scores
    differ (|diff| >= TIE_TOL), in a fixed order (prompts by first appearance, then i, then j). A pair scores 1 if
    sign(rm_i - rm_j) == sign(gold_i - gold_j), 0.5 if the RM scores tie, 0 if the RM orders them the other way.

    Returns (values, clusters), clusters[k] = the prompt of pair k. The pairs depend on the gold scores and prompts
    only, so every RM scoring the same samples gets the same pairs in the same order (paired units).
    """
    rm, gold = _pair(rm_scores, gold_scores, "rm_scores", "gold_scores")
    groups = list(prompts)
    if len(groups) != rm.size:
        raise ValueError(f"prompts and rm_scores differ in length ({len(groups)} vs {rm.size})")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    values: list[float] = []
    clusters: list[Any] = []
    for g, idx in members.items():
        if len(idx) < 2:
            continue
        ix = np.asarray(idx)
        iu, ju = np.triu_indices(len(ix), k=1)
        dg = gold[ix[iu]] - gold[ix[ju]]
        dr = rm[ix[iu]] - rm[ix[ju]]
        keep = np.abs(dg) >= TIE_TOL
        # Orient each pair so that gold prefers the first element; then the RM agrees iff its diff is positive.
        out = _outcomes(dr[keep] * np.sign(dg[keep])).tolist()
        values += out
        clusters += [g] * len(out)
    return values, clusters


def rm_gold_agreement(rm_scores: Any, gold_scores: Any, group_ids: Sequence[Any]) -> float | None:
    """How often the reward model orders two samples of the same prompt the way the gold judge does.

    Over every unordered pair (i, j) of samples with group_ids[i] == group_ids[j]: pairs whose gold scores tie
    (|diff| < TIE_TOL) are skipped; otherwise the pair scores 1 if sign(rm_i - rm_j) == sign(gold_i - gold_j),
    0.5 if the RM scores tie, 0 if the RM orders them the other way. Returns the mean over the scored pairs, or None
    when there is no comparable pair (e.g. one sample per prompt, or all gold ties). The pairs: `agreement_units`.
    """
    values, _ = agreement_units(rm_scores, gold_scores, group_ids)
    return float(np.mean(values)) if values else None


def sequence_kl_estimate(logp_policy: Any, logp_ref: Any) -> float | None:
    """Monte-Carlo estimate of the sequence-level KL(pi || pi_ref) from samples drawn from the policy pi.

    `logp_policy[i]` and `logp_ref[i]` are the summed token log-probabilities of the i-th sampled continuation under
    the policy and the reference model. This is the k1 estimator, mean_i (log pi(y_i) - log pi_ref(y_i)): unbiased
    for the KL when y_i ~ pi, but a single sample's term may be negative (so may the mean, for few samples).
    None when there are no samples.
    """
    p, r = _pair(logp_policy, logp_ref, "logp_policy", "logp_ref")
    if p.size == 0:
        return None
    return float((p - r).mean())
