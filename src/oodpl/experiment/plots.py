"""The benchmark's PNG plots from a results.json (experiment.results.Results): the gold-vs-KL frontier, per-domain
bars of the endpoints with 95% t-intervals over seeds, and the meta-training curves."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from oodpl.errors import atomic_write_bytes
from oodpl.evaluation.stats import endpoint_kind, t_interval
from oodpl.experiment.results import Results, as_results, seed_level
from oodpl.runtime.rundir import RunLayout


def make_plots(directory: Path, results: Results | dict) -> list[str]:
    """PNG plots under directory/plots; returns their paths relative to `directory`. The frontier plot only with
    at least two beta_test values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, directory = as_results(results), Path(directory)
    made: list[str] = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(RunLayout(directory).plots / name, buf.getvalue())
        made.append(f"plots/{name}")

    if len(results.betas) >= 2 and _frontier_plot(plt, results):
        save(plt.gcf(), "frontier.png")
    bars = [k for k in ("pl_accuracy", "rm_gold_agreement", "gold_at_matched_kl")
            if any(results.has(m, k) for m in results.ran_methods())]
    if bars:
        _domain_bars(plt, results, bars)
        save(plt.gcf(), "by_domain.png")
    if _curves_plot(plt, results):
        save(plt.gcf(), "meta_training.png")
    return made


def _frontier_plot(plt, results: Results) -> bool:
    """Gold reward vs KL per method: per beta_test, the mean over cells; error bars = 95% t-intervals over seeds
    of the domain-averaged gold reward (vertical) and KL (horizontal)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for m in results.ran_methods():
        per_beta: dict[Any, dict[Any, list[tuple[float, float]]]] = {}
        for c in results.cells:
            if c.method != m:
                continue
            for p in c.frontier:
                if p.get("kl") is not None and p.get("gold_reward") is not None:
                    per_beta.setdefault(p.get("beta"), {}).setdefault(c.seed, []).append(
                        (float(p["kl"]), float(p["gold_reward"])))
        pts = []
        for beta, by_seed in per_beta.items():
            kl = t_interval([np.mean([x for x, _ in v]) for v in by_seed.values()])
            gold = t_interval([np.mean([y for _, y in v]) for v in by_seed.values()])
            pts.append((kl, gold, beta))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0]["mean"])
        err = (lambda ci: [[0.0 if ci["low"] is None else ci["mean"] - ci["low"]],
                           [0.0 if ci["high"] is None else ci["high"] - ci["mean"]]])
        xs, ys = [p[0]["mean"] for p in pts], [p[1]["mean"] for p in pts]
        line = ax.plot(xs, ys, marker="o", label=m)[0]
        for kl, gold, beta in pts:
            ax.errorbar([kl["mean"]], [gold["mean"]], xerr=err(kl), yerr=err(gold), color=line.get_color(),
                        capsize=2, lw=0.8)
            if beta is not None:
                ax.annotate(f"β={beta:g}", (kl["mean"], gold["mean"]), fontsize=7, color=line.get_color(),
                            xytext=(3, 3), textcoords="offset points")
        drawn = True
    ax.set_xlabel("KL(π || π_ref) of evaluation samples (nats)")
    ax.set_ylabel("gold reward")
    ax.set_title("Gold reward vs KL, one point per beta_test\n(mean over cells; bars: 95% t-intervals over seeds)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        plt.close(fig)
    return drawn


def _domain_bars(plt, results: Results, metrics: list[str]) -> None:
    """Per held-out domain and method: mean over seeds, error bars = 95% t-interval over seeds."""
    domains = results.domain_names()
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 1.6 * len(domains) + 2) * len(metrics), 4.2),
                             squeeze=False)
    for ax, k in zip(axes[0], metrics):
        methods = [m for m in results.ran_methods() if results.has(m, k)]
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            cis = [seed_level(results.cells, m, k, d) for d in domains]
            means = [np.nan if ci["mean"] is None else ci["mean"] for ci in cis]
            lo = [0.0 if ci["low"] is None else ci["mean"] - ci["low"] for ci in cis]
            hi = [0.0 if ci["high"] is None else ci["high"] - ci["mean"] for ci in cis]
            ax.bar([j + i * width for j in range(len(domains))], means, width, yerr=[lo, hi], label=m, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))])
        ax.set_xticklabels(domains, rotation=15, fontsize=8)
        ax.set_title(f"{k} ({endpoint_kind(k)})", fontsize=10)
        ax.axhline(0.5 if k != "gold_at_matched_kl" else 0.0, color="black", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Per held-out domain: mean over seeds, 95% t-interval over seeds")
    fig.tight_layout(rect=(0, 0, 1, 0.93))


def _curves_plot(plt, results: Results) -> bool:
    curves = results.meta_curves
    series = [(f"{m} ({s})", rows) for s, per in curves.items() for m, rows in (per or {}).items() if rows]
    keys: list[str] = []
    for _, rows in series:
        for r in rows:
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                    keys.append(k)
    first = ["outer_loss", "bt_loss", "grad_ratio", "inner_kl", "query_accuracy"]
    keys = ([k for k in first if k in keys] + [k for k in keys if k not in first])[:6]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for label, rows in series:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                   and "step" in r]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], label=label, lw=1)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("outer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Meta-training curves")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return True
