"""report.py on a synthetic results.json v2 with a known answer: verdict directions, n's, plots, CSV rows."""

import copy
import csv

import numpy as np
import pytest

from oodpl.experiment.plots import make_plots
from oodpl.experiment.report import render_report, summary_table, verdict_lines, write_csv

SEEDS, DOMAINS = [0, 1, 2], ["d_amazon", "d_apple", "d_yelp"]
METHODS = ["reference", "erm-rm", "erm-rm-extra", "meta-rm", "dpo"]
PROMPTS, PER_PROMPT = 8, 4


def _units(values):
    return {"values": [float(v) for v in values], "clusters": [i // PER_PROMPT for i in range(len(values))]}


def synthetic_results(betas=(0.05,)):
    """3 seeds x 3 domains x 5 methods. By construction (paired units): meta-rm's PL accuracy is clearly higher
    than both baselines' in every cell, its RM-gold agreement clearly lower; dpo has PL accuracy only."""
    rng = np.random.default_rng(0)
    n = PROMPTS * PER_PROMPT
    cells = []
    for s in SEEDS:
        for d in DOMAINS:
            base_pl = (rng.random(n) < 0.55).astype(float)
            base_ag = (rng.random(n) < 0.7).astype(float)
            gold_ref = rng.normal(0.0, 0.3, n)
            flip = rng.random(n) < 0.5
            per = {
                "erm-rm": (base_pl, base_ag),
                "erm-rm-extra": (np.where(rng.random(n) < 0.05, 1.0, base_pl), base_ag),
                "meta-rm": (np.where(flip, 1.0, base_pl), np.where(flip, 0.0, base_ag)),
                "dpo": ((rng.random(n) < 0.6).astype(float), None),
            }
            for i, m in enumerate(METHODS):
                pl, ag = per.get(m, (None, None))
                gold = gold_ref + 0.05 * i
                frontier = [{"beta": b, "kl": 0.1 * i / b ** 0.5 if m != "reference" else 0.0,
                             "gold_reward": float(gold.mean()) - b, "gold_reward_ci": None} for b in betas]
                units = {"gold_reward": _units(gold)}
                if pl is not None:
                    units["pl_accuracy"] = _units(pl)
                if ag is not None:
                    units["rm_gold_agreement"] = _units(ag)
                cells.append({
                    "seed": s, "domain": d, "method": m, "beta": None if m in ("reference", "dpo") else betas[0],
                    "metrics": {
                        "pl_accuracy": None if pl is None else float(pl.mean()),
                        "rm_gold_agreement": None if ag is None else float(ag.mean()),
                        "gold_reward": float(gold.mean()), "kl": 0.1 * i,
                        "gold_at_matched_kl": None if len(betas) < 2 or m == "reference" else float(gold.mean()),
                        "win_rate_vs_reference": None if m == "reference" else 0.5 + 0.02 * i,
                        "win_rate_vs_erm": None if m in ("reference", "erm-rm") else 0.5 + 0.01 * i,
                    },
                    "n": {"eval_pairs": n, "agreement_pairs": n, "eval_prompts": PROMPTS, "samples": n},
                    "units": units, "frontier": frontier, "matched_kl": 0.2 if len(betas) > 1 else None,
                })
    return {
        "version": 2, "config": {"seed": 0, "meta": {"outer_steps": 4}}, "seeds": SEEDS, "methods": METHODS,
        "baselines": ["erm-rm", "erm-rm-extra"],
        "split": {"task": "sentiment",
                  "meta_train": {"m1": {"support_prompts": 16, "query_pairs": 32}},
                  "held_out": {d: {"adapt_prompts": 16, "eval_prompts": PROMPTS, "eval_pairs": n} for d in DOMAINS}},
        "domains": DOMAINS, "betas": list(betas), "cells": cells,
        "samples_table": {"d_amazon": [{"prompt": "the film | was", "reference": "ok\nfine", "erm-rm": "good",
                                        "meta-rm": "great " * 100}]},
        "diagnostics": {"seed-0": {"meta-rm": {"grad_ratio": [5.0, 2.0, 1.0], "reward_spread_ref":
                                               {"before": 0.015, "after": 0.38}, "inner_step_length": [0.1, 0.2]}}},
        "selection": {"meta-rm": {"criterion": "outer_loss", "best": {"meta.outer_lr": 1e-4},
                                  "candidates": [{"meta.outer_lr": 1e-4, "score": 0.61}, {"meta.outer_lr": 3e-4,
                                                                                         "score": 0.66}]}},
        "timings": {"units": {"a": 1.0}, "by_stage": {"meta_train": 10.0}, "by_method": {"meta-rm": 12.5},
                    "total_unit_seconds": 12.5, "wall_seconds_this_run": 13.0},
        "meta_curves": {"seed-0": {"meta-rm": [{"step": 1, "outer_loss": 0.7, "bt_loss": 0.69, "grad_ratio": 5.0},
                                               {"step": 2, "outer_loss": 0.6, "bt_loss": 0.68, "grad_ratio": 2.0}]}},
        "provenance": {"command": "oodpl benchmark --config configs/evidence.yaml", "date": "2025-01-01",
                       "machine": "2 CPU cores", "wall_seconds": 3600.0},
    }


def test_verdicts_follow_the_known_directions_and_come_primary_first():
    lines = verdict_lines(synthetic_results())
    assert lines[0].startswith("On held-out PL accuracy (primary), meta-rm is higher than erm-rm by ")
    assert lines[1].startswith("On held-out PL accuracy (primary), meta-rm is higher than erm-rm-extra by ")
    assert any(s.startswith("On RM-gold agreement on shared pi_ref samples (primary), meta-rm is lower than erm-rm ")
               for s in lines)
    assert any(s.startswith("On held-out PL accuracy (primary), dpo ") for s in lines)
    assert not any("dpo" in s and "RM-gold agreement on shared" in s for s in lines)  # dpo has no such metric
    kinds = ["(primary)" in s for s in lines]
    assert kinds == sorted(kinds, reverse=True)  # every primary sentence before any secondary one
    assert all("over 3 seeds" in s and "9 cells" in s for s in lines)


def test_every_other_method_is_also_compared_with_meta_rm():
    lines = verdict_lines(synthetic_results())
    # by construction dpo's win rate against pi_ref is meta-rm's + 0.02 in every cell
    assert any(s.startswith("On win rate against the reference policy (secondary), dpo is higher than meta-rm by "
                            "0.020") for s in lines)
    assert any(s.startswith("On held-out PL accuracy (primary), dpo shows no significant difference from meta-rm")
               for s in lines)
    assert not any(s.startswith("On held-out PL accuracy (primary), meta-rm") and "than meta-rm" in s for s in lines)
    without = synthetic_results()
    without["cells"] = [c for c in without["cells"] if c["method"] != "meta-rm"]
    assert not any("meta-rm" in s for s in verdict_lines(without))


def test_summary_table_shows_n_and_intervals():
    table = summary_table(synthetic_results())
    row = next(l for l in table.splitlines() if l.startswith("| meta-rm |"))
    assert row.count("(n=9)") >= 2 and row.count("[") >= 2
    ref = next(l for l in table.splitlines() if l.startswith("| reference |"))
    assert "n/a" in ref  # no PL accuracy for pi_ref


def test_report_sections_in_order_with_n_and_no_frontier_with_one_beta(tmp_path):
    res = synthetic_results(betas=(0.05,))
    plots = make_plots(tmp_path, res)
    assert "plots/frontier.png" not in plots and not (tmp_path / "plots" / "frontier.png").exists()
    assert {"plots/by_domain.png", "plots/meta_training.png"} <= set(plots)
    assert all((tmp_path / p).stat().st_size > 1000 for p in plots)
    md = render_report(res, plots, tmp_path)
    order = ["Generated by `oodpl benchmark --config configs/evidence.yaml`", "## Verdicts", "**Primary endpoints**",
             "## Paired comparisons", "## Summary per method", "## Per held-out domain", "## Plots",
             "## Samples side by side", "## Diagnostics", "## Selection", "## Timings", "## What n means"]
    pos = [md.index(s) for s in order]
    assert pos == sorted(pos)
    assert "No frontier plot" in md and "frontier.png" not in md
    assert "meta-rm is higher than erm-rm-extra" in md and "meta-rm is lower than erm-rm" in md
    assert "| 32 / 8 |" in md  # units / prompts of a cell
    assert "(n=9)" in md
    assert "the film \\| was" in md and "ok ⏎ fine" in md and "…" in md  # escaped, joined, truncated
    assert "grad_ratio" in md and "5.000 → 1.000" in md and "before 0.015, after 0.380" in md
    assert "`meta.outer_lr=0.0001`" in md
    # a count is a count: warm-rm's M candidates render as 3 and 5, not 3.000
    res["selection"]["warm-rm"] = {"criterion": "pair_accuracy", "best": {"field.warm_members": 3}, "folds": ["m1", "m2"],
                                   "candidates": [{"field.warm_members": 3, "pair_accuracy": 0.73},
                                                  {"field.warm_members": 5, "pair_accuracy": 0.724}]}
    md = render_report(res, plots, tmp_path)
    assert "criterion `pair_accuracy` over the left-out meta-train domains m1, m2; chosen" in md
    assert "| 0 | 3 | 0.730 |" in md and "| 1 | 5 | 0.724 |" in md and "`field.warm_members=3`" in md
    # the paired comparisons table: meta-rm vs erm-rm on pl_accuracy over 9 cells, all 9 higher
    row = next(l for l in md.splitlines() if l.startswith("| pl_accuracy | primary | meta-rm | erm-rm |"))
    assert "| 9 | higher |" in row


def test_frontier_plot_with_two_betas(tmp_path):
    res = synthetic_results(betas=(0.05, 0.2))
    plots = make_plots(tmp_path, res)
    assert "plots/frontier.png" in plots and (tmp_path / "plots" / "frontier.png").stat().st_size > 1000
    md = render_report(res, plots, tmp_path)
    assert "![gold reward vs KL](plots/frontier.png)" in md and "No frontier plot" not in md


def test_csv_has_one_row_per_cell_and_metric(tmp_path):
    res = synthetic_results()
    write_csv(tmp_path / "results.csv", res)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 3 * 3 * 5 * 7
    r = next(r for r in rows if (r["seed"], r["domain"], r["method"], r["metric"]) == ("1", "d_apple", "meta-rm",
                                                                                        "pl_accuracy"))
    cell = next(c for c in res["cells"] if (c["seed"], c["domain"], c["method"]) == (1, "d_apple", "meta-rm"))
    assert float(r["value"]) == pytest.approx(cell["metrics"]["pl_accuracy"])
    assert (r["units"], r["clusters"]) == ("32", "8")
    assert float(r["boot_low"]) <= float(r["value"]) <= float(r["boot_high"])
    ref = next(r for r in rows if r["method"] == "reference" and r["metric"] == "pl_accuracy")
    assert ref["value"] == "" and ref["units"] == ""


def test_unpaired_units_are_refused(tmp_path):
    res = synthetic_results()
    bad = copy.deepcopy(res)
    cell = next(c for c in bad["cells"] if c["method"] == "meta-rm")
    cell["units"]["pl_accuracy"]["values"].append(1.0)
    cell["units"]["pl_accuracy"]["clusters"].append(99)
    with pytest.raises(ValueError, match="not the same items"):
        render_report(bad, [], tmp_path)


def test_provenance_says_when_the_units_were_computed_by_earlier_invocations(tmp_path):
    res = synthetic_results(betas=(0.05,))
    assert "wall time 3600 s (60.0 min)" in render_report(res, [], tmp_path)
    res["provenance"]["wall_seconds"] = 0.4
    res["timings"]["total_unit_seconds"] = 8472.2
    md = render_report(res, [], tmp_path)
    assert "wall time 0 s (0.0 min)" not in md
    assert "wall time of this invocation 0 s; its units were computed by earlier invocations (sum of unit times " \
           "8472 s = 141.2 min" in md
