"""Benchmark outputs: results.csv, report.md (tables, an honest meta-rm vs erm-rm sentence, budgets, timings,
configuration) and PNG plots (matplotlib Agg), all computed from results.json (schema: benchmark.py)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .errors import atomic_write_bytes, atomic_write_text

META_METHODS = {"meta-rm", "meta-rm-bt0", "meta-rm-k3"}
METRICS = ["pl_accuracy", "gold_reward", "kl", "win_rate_vs_reference", "win_rate_vs_erm", "rm_gold_agreement"]

METRIC_MEANING = {
    "pl_accuracy": "fraction of the held-out domain's human preference pairs (eval_pairs) that the method's reward "
                   "orders correctly, ties 1/2 (dpo: its implicit reward beta*(log pi - log pi_ref)); "
                   "n/a for reference and gold-reward",
    "gold_reward": "mean gold-judge score of the policy's samples on the held-out eval prompts "
                   "(sentiment: VADER compound in [-1, 1]; knowledge: cosine similarity to the human reference)",
    "kl": "mean of log pi(y|x) - log pi_ref(y|x) over those samples (k1 estimate of the sequence-level KL, nats)",
    "win_rate_vs_reference": "fraction of (prompt, sample index) slots where the judge prefers the method's sample "
                             "to pi_ref's sample, ties 1/2 (0.5 = no better than pi_ref)",
    "win_rate_vs_erm": "the same against the erm-rm policy's samples (0.5 = as good as ordinary RLHF)",
    "rm_gold_agreement": "how often the method's reward model orders two of the method's own samples for the same "
                         "prompt the way the gold judge does (its accuracy where it is used); n/a without an RM",
}





def write_csv(path: Path, results: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "domain", "metric", "mean", "std", "n", "per_seed"])
    for m, mv in results["methods"].items():
        rows = list(mv["domains"].items()) + [("mean_over_domains", mv["mean_over_domains"])]
        for d, dv in rows:
            for k in METRICS:
                a = dv[k]
                w.writerow([m, d, k, "" if a["mean"] is None else a["mean"], "" if a["std"] is None else a["std"],
                            a["n"], json.dumps(a["per_seed"])])
    atomic_write_text(path, buf.getvalue())


def _cell(a: dict, digits: int = 3) -> str:
    if a is None or a["mean"] is None:
        return "n/a"
    if a["n"] > 1:
        return f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"
    return f"{a['mean']:.{digits}f}"


def metric_table(results: dict, metric: str) -> str:
    methods = list(results["methods"])
    domains = list(next(iter(results["methods"].values()))["domains"]) if methods else []
    head = "| method | " + " | ".join(domains) + " | mean over domains |"
    sep = "|---" * (len(domains) + 2) + "|"
    lines = [head, sep]
    for m in methods:
        mv = results["methods"][m]
        cells = [_cell(mv["domains"][d][metric]) for d in domains] + [_cell(mv["mean_over_domains"][metric])]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_table(results: dict) -> str:
    """Methods x metrics, each the mean over held-out domains (± std over seeds)."""
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for m, mv in results["methods"].items():
        lines.append(f"| {m} | " + " | ".join(_cell(mv["mean_over_domains"][k]) for k in METRICS) + " |")
    return "\n".join(lines)


def comparison_sentence(results: dict) -> str:
    """An honest one-paragraph comparison of meta-rm with erm-rm, computed from the numbers."""
    ms = results["methods"]
    if "meta-rm" not in ms or "erm-rm" not in ms:
        return "meta-rm and erm-rm were not both run, so they are not compared."
    n = len(results["seeds"])
    parts = []
    for k, what, higher in (("gold_reward", "gold reward", True), ("pl_accuracy", "held-out PL accuracy", True)):
        a, b = ms["meta-rm"]["mean_over_domains"][k], ms["erm-rm"]["mean_over_domains"][k]
        if a["mean"] is None or b["mean"] is None:
            continue
        diff = a["mean"] - b["mean"]
        verb = "ties with" if diff == 0 else ("beats" if (diff > 0) == higher else "loses to")
        spread = max(a["std"] or 0.0, b["std"] or 0.0)
        note = ""
        if n == 1:
            note = " (one seed: no spread is estimated, so this is not evidence of a real difference)"
        elif abs(diff) <= spread:
            note = f" (within one seed standard deviation, {spread:.3f}: not a reliable difference)"
        parts.append(f"on {what} meta-rm {verb} erm-rm ({a['mean']:.3f} vs {b['mean']:.3f}, "
                     f"difference {diff:+.3f}){note}")
    w = ms["meta-rm"]["mean_over_domains"]["win_rate_vs_erm"]
    if w["mean"] is not None:
        verb = "wins" if w["mean"] > 0.5 else ("loses" if w["mean"] < 0.5 else "ties")
        parts.append(f"in head-to-head judge comparisons meta-rm {verb} against erm-rm "
                     f"(win rate {w['mean']:.3f}; 0.5 = even)")
    if not parts:
        return "No metric is available for both meta-rm and erm-rm."
    text = "; ".join(parts)
    return "Averaged over the held-out domains, " + text + "."


def make_plots(directory: Path, results: dict, first_seed: int) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = directory / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        made[name] = f"plots/{name}"

    # gold reward vs KL: one point per beta_test, averaged over held-out domains (and seeds)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, per_domain in results["frontier"].items():
        by_beta: dict = {}
        for pts in per_domain.values():
            for p in pts:
                if p["gold_reward"] is None or p["kl"] is None:
                    continue
                key = p["beta"]
                by_beta.setdefault(key, []).append((p["kl"], p["gold_reward"]))
        xs, ys, labels = [], [], []
        for key in sorted(by_beta, key=lambda b: -1 if b is None else b):
            v = by_beta[key]
            xs.append(sum(x for x, _ in v) / len(v))
            ys.append(sum(y for _, y in v) / len(v))
            labels.append(key)
        if not xs:
            continue
        line = ax.plot(xs, ys, marker="o", label=m)[0]
        for x, y, b in zip(xs, ys, labels):
            if b is not None and len(labels) > 1:
                ax.annotate(f"β={b:g}", (x, y), fontsize=7, color=line.get_color(), xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("KL(π || π_ref) of samples (nats, mean over held-out domains)")
    ax.set_ylabel("gold reward (mean over held-out domains)")
    ax.set_title("Gold reward vs KL (one point per beta_test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "frontier.png")

    # per-domain bars of gold reward (first beta_test), error bars = std over seeds
    methods = list(results["methods"])
    domains = list(next(iter(results["methods"].values()))["domains"]) if methods else []
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(domains) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [results["methods"][m]["domains"][d]["gold_reward"] for d in domains]
        ax.bar([j + i * width for j in range(len(domains))], [v["mean"] or 0.0 for v in vals], width,
               yerr=[v["std"] or 0.0 for v in vals], label=m, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))])
    ax.set_xticklabels(domains, rotation=15, fontsize=8)
    ax.set_ylabel("gold reward (first beta_test)")
    ax.set_title("Gold reward per held-out domain")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    save(fig, "gold_reward_by_domain.png")

    # meta-training curves of the first seed
    runs = [(m, directory / f"seed-{first_seed}" / m / "metrics.jsonl") for m in methods if m in META_METHODS]
    runs = [(m, p) for m, p in runs if p.exists()]
    if runs:
        keys = ["outer_loss", "bt_loss", "query_accuracy"]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for m, p in runs:
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for ax, k in zip(axes, keys):
                pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], label=m)
        for ax, k in zip(axes, keys):
            ax.set_title(k)
            ax.set_xlabel("outer step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Meta-training (seed {first_seed})")
        fig.tight_layout(rect=(0, 0, 1, 0.92))  # keep the title clear of the panel titles
        save(fig, "meta_training.png")
    return made


def render_report(results: dict, plots: dict[str, str], directory: Path) -> str:
    cfg = results["config"]
    seeds = results["seeds"]
    split = results["split"]
    t = results["timings"]
    L = ["# oodpl benchmark report", ""]
    L.append(f"Task **{split['task']}**; held-out domains: {', '.join(split['held_out'])}; "
             f"meta-train domains: {', '.join(split['meta_train'])}; seeds {seeds} (cfg.seed per seed; the data split "
             f"uses data.seed={cfg['data']['seed']} for every seed).")
    L.append("")
    sel = results.get("selection")
    if sel:
        L.append(f"meta-rm settings chosen by leave-one-domain-out within the meta-train domains (criterion "
                 f"{sel['criterion']}, folds {', '.join(sel['folds'])}; held-out labels unused): "
                 + ", ".join(f"`{k}={v}`" for k, v in sel["best"].items()) + " (details: select/selection.md).")
        L.append("")
    L.append("## Main table (mean over held-out domains; ± = std over seeds; first beta_test "
             f"= {cfg['meta_test']['beta_test'][0]:g})")
    L.append("")
    L.append(main_table(results))
    L.append("")
    L.append(comparison_sentence(results))
    L.append("")
    L.append("## What each number means")
    L.append("")
    for k in METRICS:
        L.append(f"- `{k}`: {METRIC_MEANING[k]}.")
    L.append("- Each cell is the mean over seeds of the per-seed value (± the standard deviation over seeds when there "
             "is more than one seed); `n/a` = the metric does not apply. The 95% interval of `gold_reward` over "
             "samples is in results.json (`gold_reward_ci`, per seed).")
    L.append("- Upper bounds, not competitors: `oracle-rm` trains on labelled pairs of the held-out domain itself, "
             "`gold-reward` optimises the gold judge itself.")
    L.append("")
    L.append("## Per-domain tables")
    for k in METRICS:
        L.append("")
        L.append(f"### {k}")
        L.append("")
        L.append(metric_table(results, k))
    L.append("")
    L.append("## Plots")
    L.append("")
    for name, rel in plots.items():
        L.append(f"![{name}]({rel})")
    L.append("")
    L.append("## Budgets")
    L.append("")
    mt, rl, me, pc = cfg["meta_test"], cfg["rloo"], cfg["meta"], cfg["policy"]
    pairs = sum(v["query_pairs"] for v in split["meta_train"].values())
    L.append(f"- Models: policy `{pc['name_or_path']}` ({pc['trainable']}, r={pc['lora_r']}), reward backbone "
             f"`{cfg['reward']['name_or_path']}`; judge `{cfg['eval']['judge']}`.")
    L.append(f"- Data: {len(split['meta_train'])} meta-train domains x {cfg['data']['support_size']} support prompts / "
             f"{cfg['data']['query_size']} query pairs ({pairs} pairs pooled for erm-rm and dpo); held-out: "
             f"{cfg['data']['eval_prompts']} eval prompts and {cfg['data']['eval_pairs']} eval pairs per domain.")
    L.append(f"- Meta-test (every RM method and gold-reward): {mt['steps']} RLOO steps, {mt['optimizer']} lr "
             f"{mt['lr']:g}, {rl['batch_prompts']} prompts x {rl['num_samples']} samples per step, beta_test "
             f"{mt['beta_test']}, {pc['max_new_tokens']} new tokens; evaluation: {cfg['eval']['samples_per_prompt']} "
             "samples per eval prompt.")
    L.append(f"- Meta-training (meta-rm): {me['outer_steps']} outer steps, outer lr {me['outer_lr']:g}, "
             f"{me['meta_batch_domains']} domains per step, K={me['inner_steps']}, inner lr {me['inner_lr']:g}, "
             f"beta {rl['beta']:g}, lambda_bt {me['lambda_bt']:g}, {me['query_batch']} query pairs per domain; "
             "ablations: meta-rm-bt0 (lambda_bt=0), meta-rm-k3 (K=3, truncated hypergradient).")
    L.append(f"- erm-rm / oracle-rm: Bradley-Terry, {cfg['train_rm']['epochs']} epoch(s), lr {cfg['train_rm']['lr']:g}, "
             f"batch {cfg['train_rm']['batch_size']}; oracle-rm uses at most as many pairs as erm-rm. dpo: "
             f"{cfg['benchmark']['dpo_epochs']} epoch(s), lr {cfg['benchmark']['dpo_lr']:g}, beta {rl['beta']:g}.")
    L.append("- Hyper-parameters are set on meta-train domains only; no held-out label is used except by oracle-rm "
             "(by design) and for the metrics.")
    L.append("")
    L.append("## Timings")
    L.append("")
    L.append(f"Sum of unit times {t['total_unit_seconds']:.1f} s; wall time of the last invocation "
             f"{t['wall_seconds_this_run']:.1f} s (finished units of earlier invocations are skipped).")
    L.append("")
    L.append("| stage | seconds |")
    L.append("|---|---|")
    for k, v in sorted(t["by_stage"].items()):
        L.append(f"| {k} | {v:.1f} |")
    L.append("")
    L.append("| method | seconds (training + meta-test + evaluation) |")
    L.append("|---|---|")
    for k, v in sorted(t["by_method"].items()):
        L.append(f"| {k} | {v:.1f} |")
    L.append("")
    L.append("## Configuration")
    L.append("")
    L.append("```yaml")
    import yaml

    L.append(yaml.safe_dump(cfg, sort_keys=False).rstrip())
    L.append("```")
    L.append("")
    return "\n".join(L)
