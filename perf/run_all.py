"""Run the benchmarks and regenerate perf/results.md from their JSON outputs (generated, never typed).

    python perf/run_all.py                       # every benchmark, default repetitions (long: ~40 min on 2 cores)
    python perf/run_all.py --only train_rm policy_step
    python perf/run_all.py --report-only         # rebuild results.md from perf/out/*.json

Each benchmark runs as its own process (`python perf/bench_<name>.py --json perf/out/<name>.json`), one
after the other; results.md lists, per benchmark, the exact command, the date, the machine and every number.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
ORDER = ["train_rm", "policy_step", "meta_step", "trunk", "sampling", "attention", "logprobs", "memory"]


def fmt(x, nd=2):
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _cmd(argv: list[str]) -> str:
    """The command as run from the repository root: `python perf/...` (interpreter and root made relative)."""
    root = str(HERE.parent) + "/"
    return " ".join("python" if i == 0 else a.replace(root, "") for i, a in enumerate(argv))


def section(name: str, d: dict) -> list[str]:
    L = [f"## {name}", "", f"- command (from the repository root): `{_cmd(d['argv'])}`",
         f"- date: {d['machine']['date']}; load average at the end (1/5/15 min): "
         f"{d['machine'].get('load_average_1_5_15')}", ""]
    t = d.get("times_s", {})
    if t:
        L += ["| side | median s | min s | max s | runs (s) |", "|---|---|---|---|---|"]
        L += [f"| {k} | {fmt(v['median'], 3)} | {fmt(v['min'], 3)} | {fmt(v['max'], 3)} | {v['all']} |" for k, v in t.items()]
        L.append("")
    if name == "train_rm":
        pps = d["pairs_per_second"]
        L += [f"- {d['steps']} steps x {d['batch_size']} pairs, max length {d['max_length']} "
              f"(mean tokens {fmt(d['token_length_mean'], 1)})",
              f"- pairs/s: oodpl **{fmt(pps['oodpl'])}**, TRL RewardTrainer **{fmt(pps['trl'])}**",
              f"- **ratio oodpl / TRL = {fmt(d['ratio_oodpl_over_trl'])}** (target {d['target']})",
              f"- TRL trainer construction (untimed above): median {fmt(d['trl_setup_s']['median'])} s"]
    elif name == "policy_step":
        L += [f"- {d['prompts']} prompts x {d['samples_per_prompt']} samples, <= {d['max_new_tokens']} new tokens, "
              f"beta {d['beta']}",
              f"- **ratio TRL step / oodpl step = {fmt(d['ratio_trl_step_over_oodpl'])}** (target {d['target']})",
              f"- ratio TRL whole train() call / oodpl = {fmt(d['ratio_trl_train_call_over_oodpl'])}"]
    elif name == "meta_step":
        b = d["bank"]
        L += [f"- meta-batch {d['meta_batch_domains']} domains x {d['batch_prompts']} prompts x "
              f"{d['samples_per_prompt']} samples, {d['query_batch']} query pairs per domain, K = 1 (one-step)",
              f"- **ratio meta step / (BT step + RLOO step) = {fmt(d['ratio_meta_over_baseline'])}** "
              f"(target {d['target']})",
              f"- with the bank generation of the {b['samples_consumed_per_step']} samples the step consumes added "
              f"({fmt(b['per_sample_s'], 3)} s/sample): **{fmt(d['ratio_bank_included'])}**",
              f"- with the whole bank ({b['samples']} samples, {fmt(b['build_s'], 1)} s) amortised over the default "
              f"{b['outer_steps_default']} outer steps: **{fmt(d['ratio_bank_amortised_default_run'])}**",
              f"- query sets (log pi_ref of all human pairs, once per run): {fmt(b['query_sets_build_s'], 1)} s", "",
              "| phase group | meta step (median s) | BT + RLOO (median s) |", "|---|---|---|"]
        g = d["group_medians_s"]
        for k in sorted(set(g["meta"]) | set(g["baseline"])):
            L.append(f"| {k} | {fmt(g['meta'].get(k), 3)} | {fmt(g['baseline'].get(k), 3)} |")
        L += ["", "Raw phases (medians, s): meta " + ", ".join(f"{k} {fmt(v, 3)}" for k, v in d['phase_medians_s']['meta'].items())
              + "; baseline " + ", ".join(f"{k} {fmt(v, 3)}" for k, v in d['phase_medians_s']['baseline'].items())]
    elif name == "sampling":
        L += [f"- {d['new_tokens']} new tokens per sequence (EOS suppressed), prompt tokens {d['prompt_tokens']}",
              "- new tokens/s: " + ", ".join(f"{k.replace('_', ' ')} **{fmt(v, 1)}**"
                                             for k, v in d["tokens_per_second"].items())]
        if "ratio_ours_over_generate" in d:
            L.append("- **ours / plain `generate`** (target >= 1.0): " + ", ".join(
                f"{k.replace('_', ' ')} **{fmt(v)}**" for k, v in d["ratio_ours_over_generate"].items()))
    elif name == "trunk":
        o = d["one_off_s"]
        L += [f"- meta step (K = 1, meta-batch {d['meta_batch_domains']} x {d['batch_prompts']} prompts x "
              f"{d['samples_per_prompt']} samples, {d['query_batch']} query pairs) with adapters on the top "
              f"{d['layers']} of {d['depth']} layers, trunk cached",
              f"- **full depth / trunk-cached = {fmt(d['ratio_full_over_trunk'])}** (target {d['target']}); "
              f"trunk-cached / (BT + RLOO) = **{fmt(d['ratio_trunk_over_baseline'])}**; full depth / (BT + RLOO) = "
              f"{fmt(d['ratio_full_over_baseline'])}",
              f"- one-off costs: bank generation {fmt(o['bank_generation'], 1)} s, trunk of the bank "
              f"{fmt(o['bank_trunk'], 1)} s, query sets with trunk {fmt(o['query_sets_with_trunk'], 1)} s"]
    elif name == "attention":
        L += [f"- one first-order pass (log-probs forward + backward to LoRA), {d['rows']} rows x {d['tokens']} tokens",
              f"- math kernel / fused SDPA = **{fmt(d['ratio_math_over_default'])}x** time; gradient checkpointing = "
              f"**{fmt(d['ratio_checkpointing_over_default'])}x** time, **{fmt(d['saved_ratio_checkpointing'])}x** "
              "saved activations",
              "- saved activations (MB): " + ", ".join(f"{k} {fmt(v, 1)}" for k, v in d["saved_activation_mb"].items())]
    elif name == "logprobs":
        L += [f"- {d['rows']} rows, T = {d['seq_len']}; max |legacy - current| = {d['max_abs_diff']:.2e}", "",
              "| pass | legacy median s | current median s | speed-up |", "|---|---|---|---|"]
        for k in ("forward_no_grad", "forward_backward", "jvp_double_backward"):
            L.append(f"| {k} | {fmt(d[k]['legacy']['median'], 3)} | {fmt(d[k]['current']['median'], 3)} | "
                     f"{fmt(d[k]['speedup_legacy_over_current'])}x |")
    elif name == "memory":
        for key, label in (("quick_preset", "quick preset end to end"), ("meta_train_default_models",
                                                                         "meta-train, default models")):
            r = d.get(key)
            if not r:
                continue
            if "skipped" in r:
                L.append(f"- {label}: skipped ({r['skipped']})")
                continue
            L.append(f"- {label}: `{_cmd(r['command'].split())}`"
                     f" -> rc {r['returncode']}, wall **{fmt(r['wall_s'] / 60, 1)} min**, peak RSS (process tree) "
                     f"**{fmt(r['peak_rss_tree_mb'] / 1024)} GB**")
            if "targets" in r:
                L.append(f"  - targets: <= {r['targets']['peak_rss_gb']} GB, <= {r['targets']['wall_min']} min; "
                         f"within: {r['within_targets']}")
            if "seconds_per_outer_step" in r:
                L.append(f"  - {fmt(r['seconds_per_outer_step'], 1)} s per outer step; a default 20-step run would take "
                         f"about {fmt(r['default_20_step_run_extrapolated_s'] / 60, 1)} min (extrapolated); timings: "
                         + ", ".join(f"{k} {fmt(v, 1)}s" for k, v in r["timings"].items()))
    L += [f"- peak RSS of the benchmark process: {fmt(d.get('peak_rss_mb'), 0)} MB" if "peak_rss_mb" in d else "", ""]
    return L


def earlier_sections() -> dict[str, str]:
    """The sections of the results.md in place, by benchmark name: kept for benchmarks not rerun this time (their
    JSON is absent), each with its own command, date and load."""
    path = HERE / "results.md"
    if not path.exists():
        return {}
    parts = re.split(r"^## ", path.read_text(), flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): "## " + p.rstrip() + "\n" for p in parts}


def report() -> None:
    results = {n: json.loads((OUT / f"{n}.json").read_text()) for n in ORDER if (OUT / f"{n}.json").exists()}
    kept = earlier_sections()
    L = ["# Benchmark results", "",
         "Generated by `python perf/run_all.py` from `perf/out/*.json`; do not edit by hand. Each pair "
         "is measured side by side in one process, alternating order, medians over the repetitions. The machine is "
         "shared: see the load averages; compare ratios, not absolute times.", ""]
    if results:
        m = next(iter(results.values()))["machine"]
        L += ["## Machine", "", "```"] + [f"{k}: {v}" for k, v in m.items() if k not in ("date",)] + ["```", ""]
    elif "Machine" in kept:
        L += kept["Machine"].splitlines() + [""]
    for n in ORDER:
        if n in results:
            L += section(n, results[n])
        elif n in kept:  # not rerun: the earlier measurement as it was (its date and load are in it)
            L += kept[n].splitlines() + [""]
    (HERE / "results.md").write_text("\n".join(L).rstrip("\n") + "\n")
    print(f"wrote {HERE / 'results.md'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=ORDER, help="run only these")
    ap.add_argument("--report-only", action="store_true", help="only regenerate results.md")
    args = ap.parse_args()
    if not args.report_only:
        OUT.mkdir(exist_ok=True)
        for n in args.only or ORDER:
            cmd = [sys.executable, str(HERE / f"bench_{n}.py"), "--json", str(OUT / f"{n}.json")]
            print("$", " ".join(cmd), flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd)
            print(f"  {n}: rc {rc}, {time.time() - t0:.0f}s", flush=True)
    report()


if __name__ == "__main__":
    main()
