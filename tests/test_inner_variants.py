"""The two variants of the inner step (method.md): demonstrations in the inner step (meta.inner_candidates:
samples+demos) and the warm-started inner policy (meta.inner_start: warm). Finite differences in float64 on tiny
random models, as tests/test_hypergradient.py does for the default step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import PROMPTS, tiny_tasks
from oodpl.bilevel import DemonstrationSet, inner_loop, meta_gradient, reward_value_grads, step_leverage
from oodpl.config import MetaConfig, RLOOConfig
from oodpl.policy_opt import centred_standardise, pull_back_centred_standardisation
from test_hypergradient import RLOO, RLOO_STD, _directional_fd, _grad_and_params

# ----------------------------------------------------------------------------------------------------------------------
# Demonstrations in the inner step


def _check_fd(policy, rm, tasks, meta, rloo, eps):
    params, grad = _grad_and_params(policy, rm, tasks, meta, rloo)
    gen = torch.Generator().manual_seed(1)
    errors = []
    for _ in range(2):  # two random directions in phi-space
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grad, direction)).item()
        numeric = _directional_fd(policy, rm, tasks, meta, params, direction, eps, rloo)
        assert abs(analytic) > 1e-9
        errors.append(abs(analytic - numeric) / abs(numeric))
    assert max(errors) < 1e-4, errors
    print("relative errors", errors)
    return errors


# standardising the 3 demonstrations' rewards makes F very curved in phi at inner_lr 50: the finite differences of
# the standardised step need eps = 1e-5 (at 1e-4 their truncation error alone is ~8e-3 relative at K = 2)
@pytest.mark.parametrize("rloo,eps", [(RLOO, 1e-3), (RLOO_STD, 1e-5)], ids=["raw", "standardised"])
@pytest.mark.parametrize("K,mode", [(1, "one-step"), (2, "unrolled")])
def test_hypergradient_through_demonstrations_matches_finite_differences(tiny64, K, mode, rloo, eps):
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=K, B=3, demos=True)
    assert all(d is not None and len(d.ref_logp) == 3 for t in tasks for d in t.demos)
    meta = MetaConfig(inner_steps=K, inner_lr=50.0, hypergrad=mode, lambda_bt=0.0, inner_candidates="samples+demos",
                      demo_weight=0.7)
    _check_fd(policy, rm, tasks, meta, rloo, eps)


@pytest.mark.parametrize("rloo", [RLOO, RLOO_STD], ids=["raw", "standardised"])
def test_truncated_equals_unrolled_at_k1_with_demonstrations(tiny64, rloo):
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1, B=3, demos=True)
    out = {}
    for mode in ("truncated", "unrolled", "one-step"):
        meta = MetaConfig(inner_steps=1, inner_lr=20.0, hypergrad=mode, lambda_bt=0.0, demo_weight=1.3)
        out[mode] = _grad_and_params(policy, rm, tasks, meta, rloo)[1]
    for a, b, c in zip(out["truncated"], out["unrolled"], out["one-step"]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-14)
        assert torch.allclose(a, c, rtol=1e-8, atol=1e-14)


def test_demonstrations_move_the_step_and_the_hypergradient(tiny64):
    """The demo term is really in the step: a different theta_1 and hypergradient than samples alone; at
    demo_weight 0 the step is bit for bit the samples-only step (the demo term enters through its weight alone)."""
    policy, rm = tiny64
    with_demos = tiny_tasks(policy, rm, K=1, B=3, demos=True)[:1]
    alone = tiny_tasks(policy, rm, K=1, B=3)[:1]
    rewards = [[r.detach() for r in rm_rewards] for rm_rewards in
               ([rm.forward_encoded(s.rm_encoding) for s in t.inner] for t in alone)]
    demo_r = [torch.cat([r, rm.forward_encoded(d.rm_encoding).detach()]) for r, d in
              zip(rewards[0], with_demos[0].demos)]
    meta = MetaConfig(inner_steps=1, inner_lr=20.0, lambda_bt=0.0)
    base, _ = inner_loop(policy, alone[0], rewards[0], meta, RLOO_STD)
    moved, st = inner_loop(policy, with_demos[0], demo_r, meta, RLOO_STD)
    zero, _ = inner_loop(policy, with_demos[0], demo_r, dataclasses.replace(meta, demo_weight=0.0), RLOO_STD)
    assert "demo_reward" in st[0]
    for k in base[1]:
        assert torch.equal(base[1][k], zero[1][k])
    assert max(float((base[1][k] - moved[1][k]).abs().max()) for k in base[1]) > 1e-6
    g_alone = _grad_and_params(policy, rm, alone, meta, RLOO_STD)[1]
    g_demo = _grad_and_params(policy, rm, with_demos, meta, RLOO_STD)[1]
    assert any(not torch.allclose(a, b, rtol=1e-6) for a, b in zip(g_alone, g_demo))


@pytest.mark.parametrize("scale", ["batch", None])
def test_centred_standardisation_pull_back_equals_autograd(scale):
    """dL/dr_i = (g_i - mean g)/s - (r_i - mean r)/(M s^3) sum_j g_j (r_j - mean r) against reverse mode."""
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(7, generator=gen, dtype=torch.float64)
    (auto,) = torch.autograd.grad((centred_standardise(r, scale) * g).sum(), r)
    got = pull_back_centred_standardisation(g, r.detach(), scale)
    assert torch.allclose(got, auto, rtol=1e-12, atol=1e-14)
    assert abs(float(got.sum())) < 1e-12  # a shift of every demonstration's reward changes nothing
    r_hat = centred_standardise(r.detach(), scale)
    assert abs(float(r_hat.mean())) < 1e-12
    if scale == "batch":
        assert float(r_hat.std(correction=0)) == pytest.approx(1.0, rel=1e-12)


def test_demo_value_grads_are_the_jvp_formula(tiny64):
    """Stage 1 for the demonstrations, by hand: dL/dr^_m = alpha w / M (s_m - mean s) (raw rewards: the pull-back is
    the centring alone), s_m = <grad log pi(y_m|x_m), v>, v = grad L_out(theta_1)."""
    from oodpl.bilevel import logprob_jvp, outer_loss

    policy, rm = tiny64
    [task] = tiny_tasks(policy, rm, K=1, B=3, demos=True, domains=1)
    meta = MetaConfig(inner_steps=1, inner_lr=10.0, lambda_bt=0.0, demo_weight=0.5)
    with torch.no_grad():
        r = torch.cat([rm.forward_encoded(task.inner[0].rm_encoding), rm.forward_encoded(task.demos[0].rm_encoding)])
    (g,), _, stats = reward_value_grads(policy, task, [r], meta, RLOO)
    thetas, _ = inner_loop(policy, task, [r], meta, RLOO)
    theta_1 = {k: v.detach().requires_grad_() for k, v in thetas[1].items()}
    v = dict(zip(theta_1, torch.autograd.grad(outer_loss(policy, theta_1, task.query, RLOO.beta),
                                              list(theta_1.values()))))
    _, s = logprob_jvp(policy, task.demos[0].batch, thetas[0], v)
    M, N = len(s), len(task.inner[0].ref_logp)
    assert g.numel() == N + M
    assert torch.allclose(g[N:], 10.0 * 0.5 / M * (s - s.mean()), rtol=1e-10, atol=1e-15)
    assert stats[0]["headroom"] == pytest.approx(stats[0]["headroom_samples"] + stats[0]["headroom_demos"])


def test_demonstration_set_skips_prompts_without_a_reference_and_query_responses(tiny64):
    policy, rm = tiny64
    refs = ["a quiet gem", None, "  ", "kind and  quick", "slow at first", "worth it"]
    demos = DemonstrationSet.build(policy, PROMPTS, refs, query_responses=["kind and quick", "rude and slow"])
    assert demos.support_index == [0, 4, 5]  # no reference (1, 2) or a query pair's response (3: the outer data)
    assert demos.select([1, 2, 3], policy.tokenizer.pad_token_id, rm) is None
    picked = demos.select([5, 1, 0], policy.tokenizer.pad_token_id, rm)
    assert picked.prompts == [PROMPTS[5], PROMPTS[0]] and picked.n == 1 and picked.behaviour_logp is None
    assert torch.equal(picked.ref_logp, demos.ref_logp[[2, 0]])


def test_step_leverage_with_demonstrations(tiny64):
    """H of the whole step = H_samples + H_demos; the oracle (-s~, -c) has alignment 1 and first-order drop H; for
    a small step the first-order drop is the real drop of the real step with demonstrations."""
    policy, rm = tiny64
    [task] = tiny_tasks(policy, rm, K=1, B=3, demos=True, domains=1)
    with torch.no_grad():
        r = torch.cat([rm.forward_encoded(task.inner[0].rm_encoding), rm.forward_encoded(task.demos[0].rm_encoding)])
    rloo = RLOOConfig(beta=0.1, num_samples=3, importance_clip=None)
    errors = []
    for alpha in (1e-1, 1e-3):
        out = step_leverage(policy, task, {"rm": r}, MetaConfig(inner_lr=alpha, demo_weight=2.0), rloo)
        assert out["num_demos"] == 3 and out["headroom_demos"] > 0
        assert out["headroom"] == pytest.approx(out["headroom_samples"] + out["headroom_demos"], rel=1e-12)
        assert out["oracle"]["alignment"] == pytest.approx(1.0, abs=1e-10)
        assert out["oracle"]["alignment_demos"] == pytest.approx(1.0, abs=1e-10)
        assert out["oracle"]["first_order_drop"] == pytest.approx(out["headroom"], rel=1e-10)
        assert -1 <= out["rm"]["alignment"] <= 1
        for name in ("rm", "oracle"):
            errors.append(abs(out[name]["real_drop"] - out[name]["first_order_drop"]) / abs(out[name]["first_order_drop"]))
    assert max(errors[2:]) < 1e-2, errors  # alpha = 1e-3: first order
    # without the demonstrations the same samples give H_samples
    alone = dataclasses.replace(task, demos=None)
    plain = step_leverage(policy, alone, {}, MetaConfig(inner_lr=1e-3, demo_weight=2.0), rloo)
    assert plain["headroom"] == pytest.approx(out["headroom_samples"], rel=1e-12) and plain["num_demos"] == 0


def _run_args(tmp_path, *sets, references: bool = True) -> list[str]:
    """tests/test_metatrain.py's tiny run; with `references`, support prompts from a prompts file whose prompts carry
    a human continuation."""
    import json

    from test_metatrain import tiny_args

    extra = []
    if references:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"domain": d, "prompt": f"{d} asks {i}", "reference": f"calm reply {i}"})
                                   + "\n" for d in ("alpha", "beta", "gamma") for i in range(8)))
        extra = ["data.prompts_path=" + str(prompts)]
    return tiny_args(tmp_path, steps=3, every=10) + [x for s in ("meta.init=scratch", "report_to=[none]", *extra,
                                                                 *sets) for x in ("--set", s)]


def test_meta_train_with_demonstrations(tmp_path):
    import json

    from oodpl.cli import main

    out = tmp_path / "run"
    args = _run_args(tmp_path, "meta.inner_candidates=samples+demos", "meta.demo_weight=0.5")
    assert main(["--quiet", "meta-train", "-o", str(out), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["demonstrations"] == {"alpha": 4, "beta": 4}  # every support prompt has one
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["headroom"] > 0 and "inner_iw_std" in r for r in rows)


def test_demonstrations_need_references(tmp_path, capsys):
    from oodpl.cli import main

    args = _run_args(tmp_path, "meta.inner_candidates=samples+demos", references=False)
    assert main(["--quiet", "meta-train", "-o", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "meta-train domain alpha has no support prompt with a human continuation" in err[-1]
    assert "meta.inner_candidates=samples" in err[-1]
