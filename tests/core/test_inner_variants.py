"""The two variants of the inner step (method.md): demonstrations in the inner step (meta.inner_candidates:
samples+demos) and the warm-started inner policy (meta.inner_start: warm). Finite differences in float64 on tiny
random models, as tests/core/test_hypergradient.py does for the default step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import PROMPTS, tiny_tasks
from oodpl.core.bilevel import DemonstrationSet, inner_loop, meta_gradient, reward_value_grads, step_leverage
from oodpl.config import MetaConfig, RLOOConfig
from oodpl.core.policy_opt import centred_standardise, pull_back_centred_standardisation
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
    from oodpl.core.bilevel import logprob_jvp, outer_loss

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
    """tests/train/test_metatrain.py's tiny run; with `references`, support prompts from a prompts file whose prompts carry
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

    from oodpl.cli.main import main

    out = tmp_path / "run"
    args = _run_args(tmp_path, "meta.inner_candidates=samples+demos", "meta.demo_weight=0.5")
    assert main(["--quiet", "meta-train", "-o", str(out), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["demonstrations"] == {"alpha": 4, "beta": 4}  # every support prompt has one
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["headroom"] > 0 and "inner_iw_std" in r for r in rows)


def test_demonstrations_need_references(tmp_path, capsys):
    from oodpl.cli.main import main

    args = _run_args(tmp_path, "meta.inner_candidates=samples+demos", references=False)
    assert main(["--quiet", "meta-train", "-o", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "meta-train domain alpha has no support prompt with a human continuation" in err[-1]
    assert "meta.inner_candidates=samples" in err[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Warm-started inner policy


def _warm_theta(policy, scale: float = 0.3, seed: int = 5) -> dict[str, torch.Tensor]:
    """A theta_d away from theta_init (pi_theta_d != pi_ref), fixed."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in policy.theta_init().items()}


def warm_tasks(policy, rm, K: int, demos: bool = False, domains: int = 2):
    """tiny_tasks' meta-batch started at a warm theta_d with fresh samples drawn from pi_theta_d (fixed seeds)."""
    from oodpl.models.sampling import build_bank, draw_samples

    theta_d = _warm_theta(policy)
    bank = build_bank(policy, PROMPTS, n=3, seed=0)
    tasks = tiny_tasks(policy, rm, K=K, B=3, demos=demos, domains=domains)
    for d, task in enumerate(tasks):
        task.inner = [draw_samples(policy, theta_d, s.prompts, [bank.prompt_ids[PROMPTS.index(p)] for p in s.prompts],
                                   3, 100 * d + k, rm) for k, s in enumerate(task.inner)]
        task.theta_start = theta_d
    return tasks


def test_draw_samples_at_theta(tiny64):
    """Fresh samples from pi_theta: their behaviour log-prob is log pi_theta (importance weights 1 at theta), the
    same seed draws the same samples, the module's own tensors are untouched, and pi_theta draws other responses
    than pi_ref with the same seed."""
    from oodpl.models.sampling import build_bank, draw_samples

    policy, rm = tiny64
    before = {k: v.clone() for k, v in policy.theta_init().items()}
    theta = _warm_theta(policy, scale=3.0)
    bank = build_bank(policy, PROMPTS, n=3, seed=7)
    a = draw_samples(policy, theta, PROMPTS, bank.prompt_ids, 3, seed=7, rm=rm)
    b = draw_samples(policy, theta, PROMPTS, bank.prompt_ids, 3, seed=7)
    assert torch.equal(a.batch.input_ids, b.batch.input_ids) and a.responses == b.responses
    assert torch.allclose(a.behaviour_logp, policy.logprobs(a.batch, params=theta), rtol=0, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in policy.theta_init().items())
    ref = draw_samples(policy, policy.theta_init(), PROMPTS, bank.prompt_ids, 3, seed=7)
    assert ref.responses != a.responses
    assert torch.allclose(ref.behaviour_logp, ref.ref_logp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rloo,eps", [(RLOO, 1e-3), (RLOO_STD, 1e-5)], ids=["raw", "standardised"])
@pytest.mark.parametrize("K,mode,demos", [(1, "truncated", False), (2, "unrolled", False), (1, "truncated", True)])
def test_warm_start_hypergradient_matches_finite_differences(tiny64, K, mode, demos, rloo, eps):
    """F(phi) through this outer step's K inner steps from a fixed warm theta_d (theta_d a constant: the truncation
    of the warm start), samples drawn from pi_theta_d; the hypergradient (K = 1: truncated = one-step, exact; K = 2:
    unrolled) against central differences, float64. inner_lr 10: from theta_d the standardised F is curved enough in
    phi at 50 that its differences need eps = 1e-6."""
    policy, rm = tiny64
    tasks = warm_tasks(policy, rm, K=K, demos=demos)
    meta = MetaConfig(inner_steps=K, inner_lr=10.0, hypergrad=mode, lambda_bt=0.0, demo_weight=0.7)
    _check_fd(policy, rm, tasks, meta, rloo, eps)


def test_truncated_equals_unrolled_at_k1_from_a_warm_theta(tiny64):
    policy, rm = tiny64
    tasks = warm_tasks(policy, rm, K=1)
    out = {mode: _grad_and_params(policy, rm, tasks, MetaConfig(inner_steps=1, inner_lr=20.0, hypergrad=mode,
                                                                 lambda_bt=0.0), RLOO_STD)[1]
           for mode in ("truncated", "unrolled")}
    for a, b in zip(out["truncated"], out["unrolled"]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)  # atol: the bias's gradient is 0 up to rounding


def test_meta_gradient_returns_theta_K_from_the_warm_start(tiny64):
    """`adapted` receives theta_K of every task, which starts from the task's theta_d (not theta_init); the stats
    say how far theta_d is from pi_ref."""
    policy, rm = tiny64
    tasks = warm_tasks(policy, rm, K=2)
    adapted = {}
    stats = meta_gradient(policy, rm, tasks, MetaConfig(inner_steps=2, inner_lr=5.0, lambda_bt=0.0), RLOO_STD,
                          adapted=adapted)
    assert sorted(adapted) == ["d0", "d1"]
    thetas, _ = inner_loop(policy, tasks[0], [rm.forward_encoded(s.rm_encoding).detach() for s in tasks[0].inner],
                           MetaConfig(inner_steps=2, inner_lr=5.0), RLOO_STD)
    assert all(torch.equal(adapted["d0"][k], thetas[-1][k]) for k in thetas[-1])
    assert all(torch.equal(thetas[0][k], tasks[0].theta_start[k]) for k in thetas[0])
    assert stats["inner_kl_start"] > 0 and stats["inner_iw_std"] > 0  # the second step reweights pi_theta_d samples


def test_step_leverage_at_a_warm_theta(tiny64):
    """step_leverage measures the first step from the task's theta_d: the oracle's alignment is 1 and, for a small
    step, its first-order drop is the real drop of the step from theta_d."""
    policy, rm = tiny64
    [task] = warm_tasks(policy, rm, K=1, domains=1)
    out = step_leverage(policy, task, {}, MetaConfig(inner_lr=1e-3), RLOOConfig(beta=0.1, num_samples=3))
    assert out["oracle"]["alignment"] == pytest.approx(1.0, abs=1e-10)
    drop = out["oracle"]["first_order_drop"]
    assert abs(out["oracle"]["real_drop"] - drop) < 1e-2 * abs(drop)
    at_init = step_leverage(policy, dataclasses.replace(task, theta_start=None), {}, MetaConfig(inner_lr=1e-3),
                            RLOOConfig(beta=0.1, num_samples=3))
    assert at_init["outer_loss_before"] != pytest.approx(out["outer_loss_before"], rel=1e-6)


def _same_weights(a, b) -> bool:
    from test_metatrain import weights

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_inner_reset_1_is_the_init_step_bit_for_bit(tmp_path):
    """meta.inner_start=warm with inner_reset 1 resets every domain to theta_init at every outer step and then reads
    the pi_ref bank (on-policy at theta_init): the run is today's init run, weights and metrics bit for bit."""
    import json

    from oodpl.cli.main import main

    rows = {}
    for start in ("init", "warm"):
        args = _run_args(tmp_path, "meta.inner_steps=2", f"meta.inner_start={start}", "meta.inner_reset=1",
                         references=False)
        assert main(["--quiet", "meta-train", "-o", str(tmp_path / start), *args]) == 0
        rows[start] = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                       for line in (tmp_path / start / "metrics.jsonl").read_text().splitlines()]
    assert _same_weights(tmp_path / "init", tmp_path / "warm")
    assert rows["init"] == rows["warm"]


def test_killed_warm_run_resumes_bit_identical(tmp_path):
    """A warm run (theta_d kept between outer steps, reset every 3) killed with SIGKILL after a checkpoint and
    resumed ends with the uninterrupted run's weights; its checkpoints hold every drawn domain's theta_d."""
    import json

    from test_metatrain import assert_same_run, run_killed_and_resumed, tiny_args

    args = tiny_args(tmp_path, steps=8, every=2) + [x for s in ("meta.inner_start=warm", "meta.inner_reset=3",
                                                                "report_to=[none]") for x in ("--set", s)]
    full, killed = run_killed_and_resumed(tmp_path, args, "step-000002")
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["inner_kl_start"] > 0 for r in rows] == [False, True, True, False, True, True, False, True]
    stored = torch.load(full / "checkpoints" / "step-000008" / "inner_thetas.pt", weights_only=True)
    assert sorted(stored) == ["alpha", "beta"] and all(t.abs().max() > 0 for th in stored.values() for t in th.values())
    assert_same_run(full, killed, 8)


def test_warm_start_two_processes_equal_one(tmp_path):
    """accelerate launch with 2 CPU processes: every process holds every theta_d (a domain adapted by one process
    can fall to the other at a later step: 3 meta-train domains, 2 per meta-batch), so the run is the 1-process run."""
    import json
    import os
    import subprocess
    import sys

    from oodpl.cli.main import main
    from test_metatrain import PAIRS, tiny_args

    rows = PAIRS + [{**r, "domain": "delta", "prompt": r["prompt"].replace("alpha", "delta")}
                    for r in PAIRS if r["domain"] == "alpha"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_args(tmp_path, steps=4, every=10) + [
        x for s in ("meta.init=scratch", "meta.meta_batch_domains=2", "meta.grad_clip=0", "meta.outer_lr=1e-3",
                    "meta.inner_start=warm", "meta.inner_reset=3", "report_to=[none]") for x in ("--set", s)]
    assert main(["--quiet", "meta-train", "-o", str(tmp_path / "one"), *args]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "oodpl.cli", "--quiet",
           "meta-train", "-o", str(tmp_path / "two"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["inner_kl_start"] > 0 for r in one] == [False, True, True, False]
    for key in ("hypergrad_norm", "outer_loss", "inner_kl_start"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-6), key
