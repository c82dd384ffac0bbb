"""Benchmark outputs from results.json v2 (the schema: results.py): results.csv, report.md and PNG plots.

Everything in the report is computed from a `results.Results` (the entry points also take a results.json dict and
read it through `Results.from_json`); nothing is typed in. The statistics (docs/method.md, "Statistics and
evidence") come from `stats`: the unit of evidence is a (seed, held-out domain) cell; a method is compared with each
baseline by the paired difference per cell, a 95% t-interval over seeds of the domain-averaged difference (which
alone decides a verdict) and a sign test over cells; within a cell, intervals come from a bootstrap that resamples
prompts (the samples of one prompt are not independent).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from oodpl.errors import atomic_write_json, atomic_write_text
from oodpl.experiment.methods import THIS_METHOD
from oodpl.experiment.plots import make_plots
from oodpl.experiment.results import Cell, Results, as_results, seed_level
from oodpl.runtime.rundir import RunLayout
from oodpl.evaluation.stats import (
    DESCRIPTIVE,
    METRIC_LABELS,
    PRIMARY,
    SECONDARY,
    cluster_bootstrap,
    endpoint_kind,
    fmt_num,
    fmt_p,
    fmt_signed,
    paired_cluster_bootstrap,
    paired_comparison,
    verdict_sentence,
)

ENDPOINTS = PRIMARY + SECONDARY
METRICS = list(PRIMARY + SECONDARY + DESCRIPTIVE)  # every metric a cell may carry, in report order
N_BOOT = 2000  # bootstrap replicates within a cell (seed 0: the report is deterministic)
SAMPLE_CHARS = 160  # generations longer than this are cut in the samples table

METRIC_MEANING = {
    "pl_accuracy": "fraction of the held-out domain's human preference pairs that the method's reward orders "
                   "correctly, ties 1/2 (dpo: its implicit reward)",
    "rm_gold_agreement": "how often the reward model orders two pi_ref samples of the same prompt the way the gold "
                         "judge does, on ONE shared set of pi_ref samples per held-out domain (every RM scores the "
                         "same pairs)",
    "gold_at_matched_kl": "gold reward read off the cell's frontier (gold reward vs KL over beta_test, starting at "
                          "pi_ref's point at KL 0 where every meta-test starts) at the KL every competing RM of the "
                          "cell reaches (interpolated, never extrapolated)",
    "win_rate_vs_reference": "fraction of (prompt, sample) slots where the gold judge prefers the method's sample to "
                             "pi_ref's, ties 1/2",
    "win_rate_vs_erm": "the same against the erm-rm policy's samples",
    "gold_reward": "mean gold-judge score of the policy's samples on the evaluation prompts, first beta_test",
    "kl": ("KL(pi || pi_ref) of those samples, first beta_test, in nats: the mean over samples of the exact next-token "
           "KL summed along each sample's response (models.sampling.sequence_kl; for sample files written before it, "
           "the k1 estimate mean log pi(y|x) - log pi_ref(y|x))"),
    "own_sample_agreement": "RM-gold agreement on the method's own policy samples (not comparable across RMs)",
}

DIAGNOSTIC_MEANING = {
    "distance_from_warm_start": "||phi - phi_0|| over the RM's weights from the warm start it began at (l2), and "
                                "relative to ||phi_0|| (a method that barely moves from phi_0 cannot differ from it)",
    "grad_ratio": "||hypergradient|| / ||lambda_bt * grad BT|| per logged outer step (near 1: both terms count)",
    "reward_spread_ref": "spread of the RM's rewards on pi_ref samples, before / after meta-training",
    "inner_step_length": "length of the inner policy step per logged outer step",
    "outer_loss_before": "outer loss on the meta-batch's query pairs before the inner step (at pi_ref)",
    "outer_loss": "the same after the inner step (L_out(theta_K)): lower than before when the step under r_phi moves "
                  "the policy towards the domain's human preferences",
}


# ------------------------------------------------------------------------------------------------ helpers
def _baselines(results: Results) -> list[str]:
    ran = results.ran_methods()
    return [b for b in results.baselines if b in ran]


def _compared_with(results: Results, method: str) -> list[str]:
    """Whom `method` is compared with, paired: the baselines that ran and, for every other method (the field's RMs,
    dpo, the ablations), meta-rm too: is it better than this paper's reward model?"""
    refs = _baselines(results)
    if method != THIS_METHOD and THIS_METHOD in results.ran_methods() and THIS_METHOD not in refs:
        refs = refs + [THIS_METHOD]
    return refs


def _contenders(results: Results) -> list[str]:
    """Non-baseline methods that ran, meta-rm first."""
    others = [m for m in results.ran_methods() if m not in _baselines(results)]
    return sorted(others, key=lambda m: m != THIS_METHOD)


def _metric_keys(results: Results) -> list[str]:
    present = {k for c in results.cells for k in c.metrics}
    return [k for k in METRICS if k in present] + sorted(present - set(METRICS))


def _value(cell: Cell, metric: str) -> float | None:
    return cell.metrics.get(metric)


def _lookup(results: Results) -> dict[tuple, Cell]:
    return {(c.seed, c.domain, c.method): c for c in results.cells}


def _as_dicts(cells: Iterable[Cell]) -> list[dict]:
    """Cells as the JSON objects stats.paired_comparison reads."""
    return [c.to_json() for c in cells]


def _interval(ci: dict, digits: int = 3) -> str:
    if ci.get("low") is None:
        return "n/a"
    return f"[{fmt_num(ci['low'], digits)}, {fmt_num(ci['high'], digits)}]"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _md_escape(text: Any, limit: int | None = None) -> str:
    s = " ⏎ ".join(str(text).splitlines()) if text is not None else ""
    if limit is not None and len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    return s.replace("\\", "\\\\").replace("|", "\\|")


def _table(head: list[str], rows: Iterable[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return out


# --------------------------------------------------------------------------------------- the statistics
def comparisons(results: Results | dict, metrics: Iterable[str] = ENDPOINTS,
                methods: Iterable[str] | None = None) -> list[dict]:
    """paired_comparison for every metric x non-baseline method that has it (meta-rm first) x baseline that ran (and
    meta-rm, for the other methods: _compared_with), keeping those with at least one common cell; ordered metric by
    metric (primary endpoints first)."""
    results = as_results(results)
    cells = _as_dicts(results.cells)
    methods = list(_contenders(results) if methods is None else methods)
    out = []
    for k in metrics:
        for m in methods:
            if not results.has(m, k):
                continue
            for b in _compared_with(results, m):
                if b == m:
                    continue
                comp = paired_comparison(cells, k, m, b)
                if comp["n_cells"]:
                    out.append(comp)
    return out


def verdict_lines(results: Results | dict, methods: Iterable[str] | None = None,
                  metrics: Iterable[str] = ENDPOINTS) -> list[str]:
    """One sentence per paired comparison (stats.verdict_sentence): primary endpoints first, meta-rm first within
    each, against every baseline in results.baselines that ran."""
    results = as_results(results)
    metrics = list(metrics)
    ordered = [k for k in metrics if k in PRIMARY] + [k for k in metrics if k not in PRIMARY]
    comps = comparisons(results, ordered, methods)
    rank = {m: i for i, m in enumerate(_contenders(results) if methods is None else list(methods))}
    kind = {k: endpoint_kind(k) != "primary" for k in ordered}
    comps.sort(key=lambda c: (kind[c["metric"]], rank.get(c["method"], len(rank)), ordered.index(c["metric"])))
    return [verdict_sentence(c) for c in comps]


def summary_table(results: Results | dict, metrics: Iterable[str] = ENDPOINTS) -> str:
    """Per method, each metric's mean over cells with a 95% interval and n: markdown (the table the CLI prints)."""
    results = as_results(results)
    metrics = [k for k in metrics if any(results.has(m, k) for m in results.ran_methods())]
    rows = []
    for m in results.ran_methods():
        row = [m]
        for k in metrics:
            s = seed_level(results.cells, m, k)
            row.append("n/a" if s["mean"] is None else f"{fmt_num(s['mean'])} {_interval(s)} (n={s['cells']})")
        rows.append(row)
    head = ["method"] + [f"{k} ({endpoint_kind(k)})" for k in metrics]
    note = ("Each entry: mean, 95% t-interval over seeds of the domain-averaged value, n = (seed, domain) cells "
            "with a value; n/a = does not apply.")
    return "\n".join(_table(head, rows) + ["", note])


def comparison_table(comps: list[dict]) -> str:
    rows = []
    for c in comps:
        s = c["sign"]
        sign = f"{s['positive']}/{s['n']}, p = {fmt_p(s['p'])}" + (f" ({s['ties']} tied)" if s["ties"] else "")
        rows.append([c["metric"], endpoint_kind(c["metric"]), c["method"], c["baseline"],
                     fmt_signed(c["mean_diff"]),
                     _interval(c["t"]), c["n_seeds"], sign, c["n_cells"],
                     c["verdict"] + (" (sign test: the t-interval has no width)" if c.get("t_no_width") else "")])
    head = ["metric", "endpoint", "method", "baseline", "mean diff", "95% t-interval over seeds", "seeds",
            "sign test (higher/untied, p)", "n cells", "verdict (t-interval)"]
    return "\n".join(_table(head, rows))


def _units(cell: Cell | None, metric: str) -> dict | None:
    u = None if cell is None else cell.units.get(metric)
    return u if u and u.get("values") is not None else None


def _cell_boot(cell: Cell, metric: str) -> dict | None:
    u = _units(cell, metric)
    return None if u is None else cluster_bootstrap(u["values"], u["clusters"], n_boot=N_BOOT, seed=0)


def _paired_boot(cell: Cell, base: Cell | None, metric: str) -> dict | None:
    u, v = _units(cell, metric), _units(base, metric)
    if u is None or v is None:
        return None
    if len(u["values"]) != len(v["values"]) or list(u["clusters"]) != list(v["clusters"]):
        raise ValueError(f"results.json: the {metric} units of {cell.method} and {base.method} in seed "
                         f"{cell.seed}, domain {cell.domain} are not the same items (lengths "
                         f"{len(u['values'])} vs {len(v['values'])}); the benchmark must score the same units")
    return paired_cluster_bootstrap(u["values"], v["values"], u["clusters"], n_boot=N_BOOT, seed=0)


# ------------------------------------------------------------------------------------------------- CSV
def write_csv(path: Path, results: Results | dict) -> None:
    """results.csv: one row per cell and metric, with the cell's units and prompt-clustered bootstrap interval."""
    results = as_results(results)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["seed", "domain", "method", "metric", "value", "units", "clusters", "boot_low", "boot_high",
                "matched_kl", "n"])
    blank = (lambda x: "" if x is None else x)
    for c in results.cells:
        for k, v in c.metrics.items():
            b = _cell_boot(c, k) or {}
            w.writerow([c.seed, c.domain, c.method, k, blank(v), blank(b.get("units")),
                        blank(b.get("clusters")), blank(b.get("low")), blank(b.get("high")),
                        blank(c.matched_kl), json.dumps(c.n, sort_keys=True)])
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- report
def _provenance(results: Results) -> str:
    p = results.provenance
    if not p:
        return "_Provenance: not recorded in results.json (command, date, machine, wall time)._"
    parts = []
    if p.get("command"):
        parts.append(f"Generated by `{p['command']}`")
    if p.get("date"):
        parts.append(f"on {p['date']}")
    if p.get("machine"):
        parts.append(f"on {p['machine']}")
    if p.get("wall_seconds") is not None:
        ws = float(p["wall_seconds"])
        units = float(results.timings.get("total_unit_seconds") or 0.0)
        if units > ws + 60:  # most units were computed by earlier invocations: this one's wall time says nothing
            parts.append(f"wall time of this invocation {ws:.0f} s; its units were computed by earlier invocations "
                         f"(sum of unit times {units:.0f} s = {units / 60:.1f} min, see Timings)")
        else:
            parts.append(f"wall time {ws:.0f} s ({ws / 60:.1f} min)")
    if p.get("load") is not None:
        parts.append(f"load {p['load'] if isinstance(p['load'], str) else json.dumps(p['load'])}")
    known = {"command", "date", "machine", "wall_seconds", "load"}
    parts += [f"{k}: {v}" for k, v in p.items() if k not in known]
    return ", ".join(parts) + "."


def _render_value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, int)):  # a count or a switch (field.warm_members: 3, not 3.000)
        return str(v)
    if isinstance(v, float):
        return fmt_num(v)
    if isinstance(v, list):
        nums = [float(x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if nums and len(nums) == len(v):
            if len(nums) == 1:
                return fmt_num(nums[0])
            return (f"{fmt_num(nums[0])} → {fmt_num(nums[-1])} (mean {fmt_num(float(np.mean(nums)))}, "
                    f"min {fmt_num(min(nums))}, max {fmt_num(max(nums))}, n={len(nums)})")
        return _md_escape(json.dumps(v), 200)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_render_value(x)}" for k, x in v.items())
    return _md_escape(v, 200)


def _split_lines(results: Results) -> list[str]:
    split = results.split
    L = []
    for part, title in (("meta_train", "meta-train domains"), ("held_out", "held-out domains")):
        doms = split.get(part)
        if isinstance(doms, dict) and doms and all(isinstance(v, dict) for v in doms.values()):
            cols = list(dict.fromkeys(k for v in doms.values() for k in v))
            L += [f"{title.capitalize()} (n per domain):", ""]
            L += _table(["domain"] + cols, [[d] + [v.get(c, "") for c in cols] for d, v in doms.items()])
            L.append("")
        elif doms:
            L += [f"{title.capitalize()}: {', '.join(map(str, doms))}.", ""]
    return L


def _per_domain_lines(results: Results) -> list[str]:
    lk = _lookup(results)
    baselines = _baselines(results)
    methods = results.ran_methods()
    seeds = results.seed_names()
    keys = _metric_keys(results)
    L = []
    for d in results.domain_names():
        L += [f"### {d}", ""]
        for k in keys:
            if not any(_units(lk.get((s, d, m)), k) for s in seeds for m in methods):
                continue
            rows = []
            for m in methods:
                for s in seeds:
                    c = lk.get((s, d, m))
                    if c is None or _value(c, k) is None:
                        continue
                    b = _cell_boot(c, k) or {}
                    row = [m, s, fmt_num(_value(c, k)), _interval(b),
                           f"{b.get('units', 'n/a')} / {b.get('clusters', 'n/a')}"]
                    for base in baselines:
                        pb = None if m == base else _paired_boot(c, lk.get((s, d, base)), k)
                        row.append("—" if pb is None else f"{fmt_signed(pb['mean'])} {_interval(pb)}")
                    rows.append(row)
            if rows:
                L += [f"**{k}** ({endpoint_kind(k)}): value per cell, 95% prompt-clustered bootstrap interval, and "
                      "the paired within-cell difference to each baseline (same units, bootstrap over prompts)", ""]
                L += _table(["method", "seed", k, "95% bootstrap", "units / prompts"]
                            + [f"Δ vs {b} [95%]" for b in baselines], rows)
                L.append("")
        rest = [k for k in keys if not any(_units(lk.get((s, d, m)), k) for s in seeds for m in methods)]
        rows = []
        for m in methods:
            row, any_value = [m], False
            for k in rest:
                ci = seed_level(results.cells, m, k, d)
                any_value |= ci["mean"] is not None
                row.append("n/a" if ci["mean"] is None else f"{fmt_num(ci['mean'])} {_interval(ci)} (n={ci['n']})")
            if any_value:
                rows.append(row)
        if rest and rows:
            L += ["Metrics without per-unit values: mean over seeds, 95% t-interval over seeds, n = seeds", ""]
            L += _table(["method"] + rest, rows)
            L.append("")
    return L


def _samples_lines(results: Results) -> list[str]:
    table = results.samples_table
    L = []
    for d, rows in table.items():
        if not rows:
            continue
        cols = list(dict.fromkeys(k for r in rows for k in r if k != "prompt"))
        order = ["reference", "erm-rm", "erm-rm-extra", "meta-rm"]
        cols = [c for c in order if c in cols] + [c for c in cols if c not in order]
        L += [f"### {d}", ""]
        L += _table(["prompt"] + cols,
                    [[_md_escape(r.get("prompt"), SAMPLE_CHARS)] + [_md_escape(r.get(c), SAMPLE_CHARS) for c in cols]
                     for r in rows])
        L.append("")
    return L


def _diagnostics_lines(results: Results) -> list[str]:
    diag = results.diagnostics
    rows = [[s, m, k, _render_value(v)] for s, per in diag.items() for m, ds in (per or {}).items()
            for k, v in (ds or {}).items()]
    if not rows:
        return ["No diagnostics were recorded.", ""]
    L = _table(["seed", "method", "diagnostic", "value"], rows) + [""]
    seen = {r[2] for r in rows}
    L += [f"- `{k}`: {DIAGNOSTIC_MEANING[k]}." for k in DIAGNOSTIC_MEANING if k in seen]
    L += ["- Lists are shown as first → last value (mean, min, max, n = logged steps)."]
    return L + [""]


LEFT_OUT_METRICS = {
    "outer_loss_before": "outer loss on the domain's human query pairs at pi_ref, before the inner step",
    "outer_loss_after": "the same after one inner step under the RM (mean over the drawn inner batches)",
    "outer_loss_drop": "before - after: how far the RM's inner step moves the policy towards the domain's human "
                       "preferences (the meta-objective meta-rm was trained to raise, on domains it never saw)",
    "step_length": "length of the inner policy step",
    "kl_after": "KL(pi_theta || pi_ref) after the step, on the step's pi_ref samples (nats)",
    "pair_accuracy": "the RM's own accuracy on the domain's human query pairs",
}


def _diagnostic_cell(seed: int, domain: str, method: str, metrics: dict[str, float | None]) -> Cell:
    """A diagnostic's scores of (seed, domain, method) as a Cell: metrics only (no units, counts or frontier)."""
    return Cell(seed=seed, domain=domain, method=method, beta=None, metrics=metrics, n={}, units={}, frontier=[],
                matched_kl=None)


def left_out_cells(results: Results, key: str = "left_out") -> list[Cell]:
    """The left-out diagnostic (or, with key "fit", the fit diagnostic on the meta-train domains) as (seed, domain,
    method) cells, for seed_level / paired_comparison."""
    cells = []
    for rec in getattr(results, key):
        for m, per in (rec.get("methods") or {}).items():
            for d, v in per.items():
                metrics = {k: v.get(k) for k in ("outer_loss_before", "step_length", "kl_after", "pair_accuracy")}
                metrics["outer_loss_after"] = v.get("outer_loss")
                if v.get("outer_loss") is not None and v.get("outer_loss_before") is not None:
                    metrics["outer_loss_drop"] = v["outer_loss_before"] - v["outer_loss"]
                cells.append(_diagnostic_cell(rec["seed"], d, m, metrics))
    return cells


def _against_erm(cells: list[Cell], metrics: tuple[str, ...], skip: tuple[str, ...]) -> list[str]:
    """A diagnostic's paired comparisons (metric by metric) of each of its methods but `skip` with erm-rm and
    erm-rm-extra where they are among the cells: the comparison table, or nothing when no pair shares a cell."""
    rows, methods = _as_dicts(cells), list(dict.fromkeys(c.method for c in cells))
    comps = [paired_comparison(rows, k, m, b) for k in metrics for m in methods if m not in skip
             for b in ("erm-rm", "erm-rm-extra") if b in methods]
    comps = [c for c in comps if c["n_cells"]]
    return [comparison_table(comps), ""] if comps else []


def _left_out_lines(results: Results) -> list[str]:
    recs = [r for r in results.left_out if r.get("domains")]
    if not recs:
        if results.left_out:
            return ["No meta-train-pool domain was left out of training (every non-held-out domain trains the "
                    "methods), so the left-out diagnostic has nothing to score; set data.max_domains below the "
                    "number of meta-train domains to leave some out.", ""]
        return []
    cells = left_out_cells(results)
    methods = list(dict.fromkeys(c.method for c in cells))
    domains = sorted({d for r in recs for d in r["domains"]})
    r0 = recs[0]
    L = [f"Left-out meta-train domains ({', '.join(domains)}): domains of the task that no method trained on and "
         f"that are not held out. Every RM takes the same inner step as meta-training (inner_lr {r0['inner_lr']:g}, "
         f"{r0['inner_steps']} step(s), {r0['draws']} drawn inner batches of pi_ref samples per domain); the outer "
         f"loss is scored on all of the domain's human query pairs. Mean over cells with the 95% t-interval over "
         f"seeds of the domain-averaged value; n = cells (seed x left-out domain).", ""]
    rows = []
    for m in methods:
        row = [m]
        levels = {k: seed_level(cells, m, k) for k in LEFT_OUT_METRICS}
        for k, sl in levels.items():
            digits = 4 if k.startswith("outer") else 3
            row.append(f"{fmt_num(sl['mean'], digits)} {_interval(sl, digits)}")
        rows.append(row + [levels["outer_loss_drop"]["cells"]])
    L += _table(["method", *LEFT_OUT_METRICS, "n cells"], rows) + [""]
    L += _against_erm(cells, ("outer_loss_drop", "pair_accuracy"), ("erm-rm", "erm-rm-extra"))
    L += [f"- `{k}`: {v}." for k, v in LEFT_OUT_METRICS.items()]
    return L + [""]


LEVERAGE_METRICS = {
    "alignment": "cos(r^, -s~): the fraction of the headroom the reward's direction uses (1 = the oracle)",
    "first_order_drop": "the first-order drop of the outer loss by the real step under the reward (nats)",
    "real_drop": "the real drop L_out(theta_0) - L_out(theta_1) of that step (nats; positive = lower loss)",
    "kl_after": "KL(pi_theta1 || pi_ref) after the step (nats)",
}


def leverage_cells(results: Results) -> list[Cell]:
    """The left-out leverage records as (seed, domain, reward) cells, draws averaged; the reward is an RM, the
    oracle (-s~) or the gold judge. Every cell also carries the step's headroom and floor."""
    cells = []
    for rec in results.left_out:
        for d, draws in (rec.get("leverage") or {}).items():
            names = [k for k in draws[0] if isinstance(draws[0][k], dict)]
            for name in names:
                metrics = {k: float(np.mean([r[name][k] for r in draws])) for k in LEVERAGE_METRICS}
                metrics["headroom"] = float(np.mean([r["headroom"] for r in draws]))
                metrics["floor"] = float(np.mean([r["floor"] for r in draws]))
                cells.append(_diagnostic_cell(rec["seed"], d, name, metrics))
    return cells


def _leverage_lines(results: Results) -> list[str]:
    cells = leverage_cells(results)
    if not cells:
        return []
    names = list(dict.fromkeys(c.method for c in cells))
    h, floor = seed_level(cells, "oracle", "headroom"), seed_level(cells, "oracle", "floor")
    r0 = next(r for r in results.left_out if r.get("leverage"))
    L = [f"Leverage of the inner step on the left-out meta-train domains (method.md, \"Leverage\"; the same drawn "
         f"inner batches as above, {r0['draws']} per domain): headroom H = {fmt_num(h['mean'], 4)} nats "
         f"{_interval(h, 4)}, the largest first-order drop any reward can give per inner step; a random reward's "
         f"alignment has spread {fmt_num(floor['mean'], 3)} (the floor). Mean over cells with the 95% t-interval "
         "over seeds of the domain-averaged value; n = cells (seed x left-out domain).", ""]
    rows = []
    for m in names:
        levels = {k: seed_level(cells, m, k) for k in LEVERAGE_METRICS}
        rows.append([m] + [f"{fmt_num(v['mean'], 4)} {_interval(v, 4)}" for v in levels.values()]
                    + [levels["alignment"]["cells"]])
    L += _table(["reward", *LEVERAGE_METRICS, "n cells"], rows) + [""]
    L += _against_erm(cells, ("alignment", "real_drop"), ("erm-rm", "erm-rm-extra", "oracle", "gold"))
    L += [f"- `{k}`: {v}." for k, v in LEVERAGE_METRICS.items()]
    L += ["- `oracle`: the reward -s~ (the largest first-order drop); `gold`: the gold judge's scores of the same "
          "samples (does the direction the outer loss asks for agree with the judge?)."]
    return L + [""]


def _fit_lines(results: Results) -> list[str]:
    recs = [r for r in results.fit if r.get("domains")]
    if not recs:
        return []
    cells = left_out_cells(results, "fit")
    methods = list(dict.fromkeys(c.method for c in cells))
    r0 = recs[0]
    L = [f"Fit before generalise: each reward model's inner step (inner_lr {r0['inner_lr']:g}, {r0['draws']} drawn "
         f"inner batches per domain) scored on the meta-train domains' OWN query pairs ({', '.join(r0['domains'])}: "
         "the outer loss meta-rm was trained to lower). erm-rm is phi_0, where meta-rm and erm-rm-extra start; "
         "meta-rm and erm-rm-extra are at the end of their training. Does meta-training lower its own objective "
         "more than the BT-only control?", ""]
    rows = []
    for m in methods:
        levels = {k: seed_level(cells, m, k) for k in ("outer_loss_after", "outer_loss_drop", "pair_accuracy")}
        rows.append([m] + [f"{fmt_num(v['mean'], 4)} {_interval(v, 4)}" for v in levels.values()]
                    + [levels["outer_loss_drop"]["cells"]])
    L += _table(["method", "outer_loss_after", "outer_loss_drop", "pair_accuracy", "n cells"], rows) + [""]
    return L + _against_erm(cells, ("outer_loss_drop",), ("erm-rm", "erm-rm-extra"))


def _selection_lines(results: Results) -> list[str]:
    sel = results.selection
    if not sel:
        return ["No selection was run: every method used its configured settings.", ""]
    L = []
    for m, s in sel.items():
        best = s.get("best") or {}
        folds = f" over the left-out meta-train domains {', '.join(s['folds'])}" if s.get("folds") else ""
        L += [f"- **{m}**: criterion `{s.get('criterion')}`{folds}; chosen: "
              + (", ".join(f"`{k}={v}`" for k, v in best.items()) or "n/a") + "."]
        cands = s.get("candidates") or []
        if cands and all(isinstance(c, dict) for c in cands):
            cols = list(dict.fromkeys(k for c in cands for k in c))
            L += ["", *_table(["candidate"] + cols, [[i] + [_render_value(c.get(k)) for k in cols]
                                                      for i, c in enumerate(cands)]), ""]
    return L + [""]


def _timings_lines(results: Results) -> list[str]:
    t = results.timings
    if not t:
        return ["No timings were recorded.", ""]
    L = []
    if t.get("total_unit_seconds") is not None:
        L.append(f"Sum of unit times {float(t['total_unit_seconds']):.1f} s over {len(t.get('units') or {})} units; "
                 f"wall time of the last invocation {float(t.get('wall_seconds_this_run') or 0.0):.1f} s "
                 "(finished units of earlier invocations are skipped).")
        L.append("")
    for key, name in (("by_stage", "stage"), ("by_method", "method")):
        if t.get(key):
            L += _table([name, "seconds"], [[k, f"{float(v):.1f}"] for k, v in sorted(t[key].items())]) + [""]
    return L


def _method_lines(results: Results) -> list[str]:
    """Each method's reward backbone, warm start and what of the held-out domains it saw (results.method_notes)."""
    notes = results.method_notes
    if not notes:
        return []
    rows = []
    for name, n in notes.items():
        seen = ("held-out labels (upper bound)" if n.get("target_labels") else
                "held-out adaptation prompts' pi_ref samples (no labels)" if n.get("target_prompts") else "-")
        rows.append([f"`{name}`", f"`{n['reward_backbone']}`" if n.get("reward_backbone") else "-",
                     n.get("warm_start") or "-", seen, n.get("summary", "")])
    return ["## Methods", ""] + _table(["method", "reward backbone", "warm start", "sees of the held-out domains",
                                        "what it is"], rows) + [""]


def render_report(results: Results | dict, plots: list[str], directory: Path) -> str:
    """report.md as markdown. `plots` are the paths make_plots returned (relative to `directory`)."""
    results = as_results(results)
    plots = list(plots)
    plot = {Path(p).stem: p for p in plots}
    methods, baselines = results.ran_methods(), _baselines(results)
    seeds, domains = results.seed_names(), results.domain_names()
    split = results.split
    L = ["# oodpl benchmark report", "", _provenance(results), ""]
    L.append(f"Task **{split.get('task', 'n/a')}**; {_count(len(seeds), 'seed')} {seeds} x "
             f"{_count(len(domains), 'held-out domain')} "
             f"({', '.join(domains)}) = {len(seeds) * len(domains)} cells per method; methods: {', '.join(methods)}; "
             f"baselines for the paired differences: {', '.join(baselines) or 'none ran'}"
             f"{' (and meta-rm, for every other method)' if THIS_METHOD in methods else ''}; "
             f"beta_test {results.betas}.")
    L.append("")

    L += _method_lines(results)
    L += ["## Verdicts", ""]
    L.append(f"Primary endpoints (fixed before any run): {', '.join(PRIMARY)}. Secondary: {', '.join(SECONDARY)}. "
             "Each sentence comes from a paired comparison over (seed, domain) cells: the 95% t-interval over seeds "
             "of the domain-averaged difference decides (above 0: higher, below 0: lower, else no significant "
             "difference); the sign test over cells is reported beside it, and decides where the t-interval has "
             "no width (every seed the same difference, a discrete count).")
    L.append("")
    prim = verdict_lines(results, metrics=PRIMARY)
    sec = verdict_lines(results, metrics=SECONDARY)
    L += ["**Primary endpoints**", ""] + ([f"- {s}" for s in prim] or ["- No paired comparison is possible."])
    L += ["", "**Secondary endpoints**", ""] + ([f"- {s}" for s in sec] or ["- No paired comparison is possible."])
    L.append("")

    L += ["## Paired comparisons", ""]
    comps = comparisons(results, METRICS)
    L += [comparison_table(comps) if comps else "No method and baseline share a cell.", ""]
    L.append("Mean diff = method - baseline averaged over the n cells where both have the metric; the t-interval is "
             "over seeds of the per-seed mean over domains; sign test: cells where the method is higher / cells "
             "without a tie, exact two-sided binomial p.")
    L.append("")

    L += ["## Summary per method", "", summary_table(results, METRICS), ""]
    L += [f"- `{k}` ({endpoint_kind(k)}): {METRIC_MEANING.get(k, METRIC_LABELS.get(k, k))}."
          for k in _metric_keys(results)]
    L.append("")

    L += ["## Per held-out domain", ""]
    L.append(f"Within a cell, intervals are percentile bootstraps ({N_BOOT} replicates) that resample prompts with "
             "all their units (pairs or samples), because the samples of one prompt are not independent.")
    L.append("")
    L += _per_domain_lines(results)

    L += ["## Plots", ""]
    if "frontier" in plot:
        L += [f"![gold reward vs KL]({plot['frontier']})", ""]
    else:
        L += [f"No frontier plot: it needs at least two beta_test values (this run: {results.betas}).", ""]
    if "by_domain" in plot:
        L += [f"![per-domain bars]({plot['by_domain']})", ""]
    if "meta_training" in plot:
        L += [f"![meta-training curves]({plot['meta_training']})", ""]
    else:
        L += ["No meta-training curves were recorded.", ""]
    L += [f"![{Path(p).stem}]({p})" for p in plots if Path(p).stem not in ("frontier", "by_domain", "meta_training")]

    L += ["## Samples side by side", ""]
    L += _samples_lines(results) or ["No samples table was recorded.", ""]
    L += ["## Diagnostics", ""] + _diagnostics_lines(results)
    fit = _fit_lines(results)
    if fit:
        L += ["### Fit: the meta-objective on the meta-train domains", ""] + fit
    left = _left_out_lines(results)
    if left:
        L += ["### Outer loss on left-out meta-train domains", ""] + left
    lev = _leverage_lines(results)
    if lev:
        L += ["### Leverage (headroom) on left-out meta-train domains", ""] + lev
    L += ["## Selection", ""] + _selection_lines(results)
    L += ["## Data", ""] + _split_lines(results)
    L += ["## Timings", ""] + _timings_lines(results)

    L += ["## What n means", ""]
    L.append("- Verdicts, paired comparisons, summary: n = (seed, held-out domain) cells where the metric exists for "
             "both methods (for the summary: for the method); the t-interval's n is the number of seeds.")
    L.append("- Per-domain tables: units = the items scored in the cell (pl_accuracy: held-out human pairs; "
             "rm_gold_agreement: within-prompt pairs of the shared pi_ref samples whose gold scores differ; "
             "gold_reward: policy samples), prompts = the clusters the bootstrap resamples; the per-domain means "
             "without units have n = seeds.")
    L.append("- Each cell's own counts (eval_pairs, agreement_pairs, eval_prompts, samples) are in results.csv "
             "(column n) and results.json.")
    L.append("")
    cfg = results.config
    if cfg:
        import yaml

        L += ["## Configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(L)


# ------------------------------------------------------------------ names the CLI imports (kept working)
def main_table(results: Results | dict) -> str:
    return summary_table(results)


def comparison_sentence(results: Results | dict) -> str:
    """The primary-endpoint verdicts of meta-rm (every baseline), one per line; of the other contenders in a run
    without meta-rm (the field's RMs)."""
    results = as_results(results)
    methods = [THIS_METHOD] if THIS_METHOD in results.ran_methods() else _contenders(results)
    lines = verdict_lines(results, methods=methods, metrics=PRIMARY)
    return "\n".join(lines) or f"{', '.join(methods) or 'no method'}: no primary endpoint in common with a baseline, " \
                                "so nothing is compared."


def _read_run(directory: Path) -> Results:
    from oodpl.errors import UserError

    path = directory / "results.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the directory of a finished `oodpl benchmark` run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]}); the run's results.json is damaged") from None
    return as_results(data)


def render_run(directory: str | Path, with_runs: list = (), output: str | Path | None = None) -> Results:
    """`oodpl report DIR`: report.md, results.csv and plots/ written anew from DIR/results.json by this version's
    report code (nothing is recomputed: the numbers are the run's); the provenance says so. `with_runs`
    (`--with OTHER --output OUT`): the other runs' methods added to DIR's cells (results.merge_results, which checks
    that they pair) and everything, results.json included, written to OUT; DIR is only read."""
    import datetime

    from importlib.metadata import PackageNotFoundError, version

    from oodpl.errors import UserError
    from oodpl.experiment.results import merge_results

    directory = Path(directory)
    results = _read_run(directory)
    for other in with_runs:
        results = merge_results(results, _read_run(Path(other)), str(other))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        ours = version("oodpl")
    except PackageNotFoundError:
        ours = "unknown"
    what = f"oodpl report {directory}" + "".join(f" --with {o}" for o in with_runs) + (
        f" --output {output}" if with_runs else "")
    results.provenance["rendered"] = (f"report.md rendered again from results.json by `{what}` on "
                                      f"{when} (oodpl {ours}; the numbers are the runs')")
    if with_runs:
        out = Path(output)
        if out.resolve() == directory.resolve() or (out / "oodpl_run.json").exists():
            raise UserError(f"--output {out}: a run's own directory; the merged report goes to a directory of its own")
        out.mkdir(parents=True, exist_ok=True)
        write_results(RunLayout(out), results)
    else:
        write_results(RunLayout(directory), results, results_json=False)  # the run's results.json stays as it is
    return results


def write_results(layout: RunLayout, results: Results, results_json: bool = True) -> None:
    """results.json (unless `results_json` is False), results.csv, plots/ and report.md, in that order: the report
    links the plots. The benchmark's end, --finished-seeds and `oodpl report`."""
    if results_json:
        atomic_write_json(layout.results, results.to_json())
    write_csv(layout.results_csv, results)
    plots = make_plots(layout.root, results)
    atomic_write_text(layout.report, render_report(results, plots, layout.root))
