"""Leverage of the meta-objective (leverage.py, bilevel.step_leverage) on the toy problem, where s~ has a closed form
(toy.closed_form_value_grads), and the per-step figures that meta-training logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodpl.core.bilevel import reward_value_grads, step_leverage
from oodpl.config import MetaConfig, RLOOConfig
from oodpl.core.leverage import alignment, first_order_drop, headroom, random_floor, standardised
from oodpl.toy.problem import closed_form_value_grads, make_problem, make_task

DT = torch.float64


def toy_task(B: int = 4, n: int = 4, Y: int = 5, seed: int = 0):
    problem = make_problem(seed=seed, num_domains=1, prompts_per_domain=B, num_responses=Y)
    rm = problem.rm(torch.randn(problem.features.shape[-1], generator=torch.Generator().manual_seed(seed + 1),
                                dtype=DT))
    task = make_task("d0", problem.policy, rm, problem.domains[0], problem.pairs[0], n=n,
                     generator=torch.Generator().manual_seed(seed + 2))
    return problem, rm, task


def closed_form_s_tilde(problem, task, alpha: float, beta: float) -> np.ndarray:
    """s~ by hand: closed_form_value_grads gives dL/dr_j = alpha / N * s~_j for raw rewards at K = 1."""
    zeros = [np.zeros(len(task.inner[0].ref_logp))]
    (g,), _ = closed_form_value_grads(problem.policy, task, zeros, alpha, beta, None, "one-step")
    return g * g.size / alpha


def test_headroom_and_oracle_alignment_closed_form():
    problem, rm, task = toy_task()
    alpha, beta = 0.5, 0.3
    out = step_leverage(problem.policy, task, {}, MetaConfig(inner_lr=alpha), RLOOConfig(beta=beta))
    s = closed_form_s_tilde(problem, task, alpha, beta)
    assert out["headroom"] == pytest.approx(alpha / math.sqrt(s.size) * np.linalg.norm(s), rel=1e-10)
    assert out["oracle"]["alignment"] == pytest.approx(1.0, abs=1e-12)
    # the oracle varies within prompts only: its first-order drop is the whole headroom
    assert out["oracle"]["first_order_drop"] == pytest.approx(out["headroom"], rel=1e-10)
    assert out["floor"] == pytest.approx(1 / math.sqrt(4 * 3))  # B (n - 1) directions after per-prompt centring
    # alignment is a cosine: -s~ itself gives 1, s~ gives -1, a per-prompt constant 0
    st = torch.as_tensor(s)
    assert alignment(-3 * st + 7, st, 4) == pytest.approx(1.0, abs=1e-12)
    assert alignment(st, st, 4) == pytest.approx(-1.0, abs=1e-12)
    assert alignment(torch.arange(4.0, dtype=DT).repeat_interleave(4), st, 4) == 0.0


def test_random_reward_alignment_spread_is_the_floor():
    """A random reward's alignment has mean 0 and spread 1/sqrt(B(n-1)) (~ 1/sqrt(N))."""
    s = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=DT)
    s = s.reshape(8, 4) - s.reshape(8, 4).mean(-1, keepdim=True)
    g = torch.Generator().manual_seed(6)
    cos = np.array([alignment(torch.randn(32, generator=g, dtype=DT), s.reshape(-1), 4) for _ in range(4000)])
    assert abs(cos.mean()) < 3 * random_floor(32, 4) / math.sqrt(4000)
    assert cos.std() == pytest.approx(random_floor(32, 4), rel=0.05)


@pytest.mark.parametrize("reward_norm", ["std", "none"])
def test_first_order_drop_is_the_real_drop_as_alpha_goes_to_zero(reward_norm):
    problem, rm, task = toy_task(seed=3)
    rewards = rm.forward_encoded(task.inner[0].rm_encoding).detach()
    errors = []
    for alpha in (1e-1, 1e-2, 1e-3):
        out = step_leverage(problem.policy, task, {"rm": rewards}, MetaConfig(inner_lr=alpha),
                            RLOOConfig(beta=0.2, reward_norm=reward_norm))
        for name in ("rm", "oracle"):
            pred, real = out[name]["first_order_drop"], out[name]["real_drop"]
            assert pred != 0.0
            errors.append(abs(real - pred) / abs(pred))
    assert errors[-2] < 1e-2 and errors[-1] < 1e-2  # alpha = 1e-3: first order
    assert errors[-1] < errors[1] < errors[0] or errors[-1] < 1e-4  # the error shrinks with alpha


def test_alignment_and_drop_relation():
    """first_order_drop = H * alignment for a reward that varies within prompts only (standardisation aside)."""
    s = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=DT)
    s = (s.reshape(3, 4) - s.reshape(3, 4).mean(-1, keepdim=True)).reshape(-1)
    r = standardised(torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=DT), 4)
    assert first_order_drop(r, s, 0.7) == pytest.approx(headroom(s, 0.7) * alignment(r, s, 4), rel=1e-12)


def test_meta_training_step_logs_leverage_of_its_own_step():
    """reward_value_grads' per-step stats hold H, the RM's alignment and its first-order drop computed from the
    hypergradient's own s~ (v at theta_K; closed form by hand), close to step_leverage's (v at theta_0)."""
    problem, rm, task = toy_task(seed=4)
    meta, rloo = MetaConfig(inner_lr=0.3), RLOOConfig(beta=0.2, reward_norm="none")
    rewards = [rm.forward_encoded(s.rm_encoding).detach() for s in task.inner]
    _, _, stats = reward_value_grads(problem.policy, task, rewards, meta, rloo)
    (g,), _ = closed_form_value_grads(problem.policy, task, [r.numpy() for r in rewards], 0.3, 0.2, None, "one-step")
    s_tilde = torch.as_tensor(g * g.size / 0.3)
    assert stats[0]["headroom"] == pytest.approx(headroom(s_tilde, 0.3), rel=1e-10)
    assert stats[0]["alignment"] == pytest.approx(alignment(rewards[0], s_tilde, 4), rel=1e-10)
    assert stats[0]["first_order_drop"] == pytest.approx(first_order_drop(rewards[0], s_tilde, 0.3, "none"),
                                                         rel=1e-10)
    measured = step_leverage(problem.policy, task, {"rm": rewards[0]}, meta, rloo, oracle=False)
    assert stats[0]["headroom"] == pytest.approx(measured["headroom"], rel=0.1)


# ------------------------------------------------------------------------------------------- the leverage study
def test_leverage_study_command_on_tiny_models(tmp_path, capsys):
    """`oodpl diagnose leverage`: every variation is a row with H, the oracle's real drop and KL, erm-rm's and the
    gold judge's alignment per meta-train domain; no held-out domain is touched; a rerun computes nothing again."""
    import json

    from oodpl.cli.main import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"domain": d, "prompt": f"{d} says {i}", "chosen": f"lovely kind words {i}",
                                         "rejected": f"awful bad {i}"}) + "\n"
                             for d in ("alpha", "beta", "gamma") for i in range(10)))
    prompts = tmp_path / "prompts.jsonl"  # support prompts with human continuations (the demonstrations)
    prompts.write_text("".join(json.dumps({"domain": d, "prompt": f"{d} says {i}", "reference": f"kind reply {i}"})
                               + "\n" for d in ("alpha", "beta", "gamma") for i in range(10)))
    sets = ["policy.name_or_path=tiny-random", "reward.name_or_path=tiny-random", "data.task=file",
            f"data.path={pairs}", f"data.prompts_path={prompts}", "data.held_out_domains=[gamma]", "data.support_size=4", "data.query_size=4",
            "rloo.batch_prompts=2", "rloo.num_samples=2", "policy.max_new_tokens=3", "eval.judge=vader",
            "report_to=[none]", "policy.trainable_layers=1"]
    args = [x for s in sets for x in ("--set", s)]
    out = tmp_path / "lev"
    only = ["all layers", "beta x5", "inner prompts = query prompts", "human cap from data", "samples+demos",
            "warm theta_d"]
    assert main(["--quiet", "diagnose", "leverage", "-o", str(out), "--draws", "2", "--only", *only, *args]) == 0
    study = json.loads((out / "leverage.json").read_text())
    assert [r["variation"] for r in study["rows"]] == ["baseline", "all layers", "beta x5", "human cap from data",
                                                       "inner prompts = query prompts", "samples+demos",
                                                       "warm theta_d"]
    assert study["domains"] == ["alpha", "beta"]  # meta-train domains only: gamma is held out
    for row in study["rows"]:
        assert set(row["cells"]) == {"alpha", "beta"} and all(len(c) == 2 for c in row["cells"].values())
        for cell in (c for cs in row["cells"].values() for c in cs):
            assert cell["headroom"] > 0 and cell["oracle"]["alignment"] == pytest.approx(1.0, abs=1e-9)
            assert -1 <= cell["erm-rm"]["alignment"] <= 1 and -1 <= cell["gold"]["alignment"] <= 1
            assert cell["oracle"]["kl_after"] >= 0
        assert row["summary"]["headroom"]["n"] == 2
    base, deep, beta5 = study["rows"][:3]
    assert base["setting"]["trainable_layers"] == 1 and deep["setting"]["trainable_layers"] is None
    assert beta5["setting"]["beta"] == pytest.approx(0.5)
    cap = study["rows"][3]
    assert cap["human_responses_cut"] == 0 and cap["setting"]["response_cap"] >= 3  # the data's longest response
    demos, warm = study["rows"][5], study["rows"][6]
    for cell in (c for cs in demos["cells"].values() for c in cs):  # the demonstrations join H as a second block
        assert cell["num_demos"] == 2 and cell["headroom"] == pytest.approx(cell["headroom_samples"]
                                                                             + cell["headroom_demos"], rel=1e-9)
    for cell in (c for cs in warm["cells"].values() for c in cs):  # theta_d != theta_init: L_out moved from log 2
        assert cell["outer_loss_before"] != pytest.approx(math.log(2), abs=1e-9)
    assert "| baseline |" in (out / "leverage.md").read_text()
    stamp = (out / "rows" / "baseline.json").stat().st_mtime_ns
    assert main(["--quiet", "diagnose", "leverage", "-o", str(out), "--draws", "2", "--only", *only, *args]) == 0
    assert (out / "rows" / "baseline.json").stat().st_mtime_ns == stamp
    assert main(["--quiet", "diagnose", "leverage", "-o", str(tmp_path / "x"), "--only", "nope", *args]) == 2
    assert "unknown variation 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the meta-test's reach
def test_meta_test_reach_on_tiny_models(tmp_path, capsys):
    """`oodpl diagnose meta-test`: per (lr, beta_test) the KL of the meta-test's policy after s steps, on meta-train
    domains only; step s of the study is the policy a meta-test of s steps leaves (a prefix), the choice is the
    cheapest setting reaching the target KL, and a rerun computes nothing again."""
    import json

    import numpy as np

    from oodpl.cli.main import main
    from oodpl.experiment.meta_test_reach import choose

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"domain": d, "prompt": f"{d} says {i}", "chosen": f"lovely kind words {i}",
                                         "rejected": f"awful bad {i}"}) + "\n"
                             for d in ("alpha", "beta", "gamma") for i in range(10)))
    sets = ["policy.name_or_path=tiny-random", "reward.name_or_path=tiny-random", "data.task=file",
            f"data.path={pairs}", "data.held_out_domains=[gamma]", "data.support_size=4", "data.query_size=4",
            "rloo.batch_prompts=2", "rloo.num_samples=2", "policy.max_new_tokens=3", "eval.judge=vader",
            "report_to=[none]", "meta_test.beta_test=[0.05,0.5]"]
    args = [x for s in sets for x in ("--set", s)]
    out = tmp_path / "reach"
    cmd = ["--quiet", "diagnose", "meta-test", "-o", str(out), "--lrs", "0.001", "0.1", "--steps", "3",
           "--target-kl", "1e-6", *args]
    assert main(cmd) == 0
    study = json.loads((out / "reach.json").read_text())
    assert study["domains"] == ["alpha", "beta"]  # meta-train domains only: gamma is held out
    assert not (out / "units" / "gamma").exists()
    unit = json.loads((out / "units" / "alpha" / "lr-0.1_beta-0.05.json").read_text())
    assert len(unit["kl"]) == 4 and unit["kl"][0] == pytest.approx(0.0, abs=1e-7)  # steps + 1; step 0 is pi_ref
    assert min(unit["kl"]) >= 0 and len(unit["kl_sample"]) == 4
    rows = {(r["lr"], r["beta"]): r for r in study["rows"]}
    assert set(rows) == {(0.001, 0.05), (0.001, 0.5), (0.1, 0.05), (0.1, 0.5)}
    big = rows[(0.1, 0.05)]["at"]["3"]
    assert big["kl_median"] == pytest.approx(float(np.median(list(big["kl"].values()))))
    assert big["kl_median"] > rows[(0.001, 0.05)]["at"]["3"]["kl_median"]  # a 100x larger step moves further
    # the choice: the smallest lr reaching the target within the budget, at its first such step, at the smallest
    # beta_test, by KL alone
    fake = [{"lr": 0.1, "beta": 0.05, "at": {"1": {"kl_median": 2.0}, "3": {"kl_median": 5.0}}},
            {"lr": 0.01, "beta": 0.05, "at": {"1": {"kl_median": 0.2}, "3": {"kl_median": 1.5}}},
            {"lr": 0.001, "beta": 0.5, "at": {"1": {"kl_median": 9.0}, "3": {"kl_median": 9.0}}}]
    assert choose(fake, 1.0) == {"steps": 3, "lr": 0.01, "beta": 0.05, "kl_median": 1.5}
    assert choose(fake, 1.0, budget=2) == {"steps": 1, "lr": 0.1, "beta": 0.05, "kl_median": 2.0}
    assert choose(fake, 3.0) == {"steps": 3, "lr": 0.1, "beta": 0.05, "kl_median": 5.0}
    assert choose(fake, 10.0) is None
    chosen = study["chosen"]
    assert study["budget_steps"] == 3 and chosen["beta"] == 0.05 and chosen["kl_median"] >= 1e-6
    assert chosen["kl_median"] == rows[(chosen["lr"], 0.05)]["at"][str(chosen["steps"])]["kl_median"]
    for (lr, beta), r in rows.items():  # no smaller lr got there
        if beta == 0.05 and lr < chosen["lr"]:
            assert all(a["kl_median"] < 1e-6 for a in r["at"].values())
    # a meta-test of 2 steps at lr 0.1 is the study's step-2 policy: the same samples, the same KL
    from oodpl.adapt.metatest import optimise_policy, reference_reward_scale, reward_model_fn, load_policy_samples
    from oodpl.config import load_config
    from oodpl.data.split import load_or_build_split
    from oodpl.experiment.leverage_study import leave_one_out_rm
    from oodpl.models.policy import load_policy

    cfg = load_config(None, sets + ["meta_test.lr=0.1", "meta_test.steps=3"])
    split = load_or_build_split(out / "split.json", cfg.data)
    rm = leave_one_out_rm(cfg, split, "alpha", out)
    policy = load_policy(cfg.policy, seed=cfg.seed)
    reward = reward_model_fn(rm)
    scale = reference_reward_scale(reward, load_policy_samples(out / "reference" / "alpha.json")[0])
    prompts = [p.prompt for p in split.meta_train["alpha"].support_prompts]
    hist = optimise_policy(policy, prompts, reward, cfg, 0.05, seed=cfg.seed * 1000, reward_scale=scale)["history"]
    assert [h["kl"] for h in hist] == pytest.approx(unit["kl_sample"][:3], abs=1e-6)
    assert "| 0.1 | 0.05 |" in (out / "reach.md").read_text()
    stamp = (out / "units" / "alpha" / "lr-0.1_beta-0.05.json").stat().st_mtime_ns
    assert main(cmd) == 0
    assert (out / "units" / "alpha" / "lr-0.1_beta-0.05.json").stat().st_mtime_ns == stamp
    assert main(["--quiet", "diagnose", "meta-test", "-o", str(tmp_path / "x"), "--steps", "0", *args]) == 2
    assert "--steps >= 1" in capsys.readouterr().err
