"""The toy problem of method.md: every closed form of toy.py against the bilevel core (float64, tight tolerances),
and a smoke test of the theory experiment."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from oodpl.core.bilevel import meta_gradient, meta_objective, outer_loss, reward_value_grads
from oodpl.core.objectives import bradley_terry_loss
from oodpl.core.policy_opt import policy_gradient
from oodpl.toy.problem import (LinearRM, TabularPolicy, closed_form_meta_gradient, closed_form_value_grads, core_configs,
                       exact_hypergradient, exact_inner_gradient, exact_meta_objective, expected_rloo_gradient,
                       human_pairs, inner_objective, kl_optimal_logits, make_preference_batch, make_problem,
                       make_samples, make_task, pairs_bt_loss, toy_batch)

DT = torch.float64
EXACT = 1e-10  # exact enumerations / closed forms


def _close(a, b, tol=EXACT):
    a, b = (np.asarray(v.detach() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (a, b))
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, f"max |a-b| = {np.abs(a - b).max():.3e}\n{a}\n{b}"


def _rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.fixture
def small():
    """3 prompts x 3 responses, 2 features; rewards of moderate size so every term matters."""
    policy = TabularPolicy(_rand(3, 3, seed=1, scale=0.7))
    rm = LinearRM(_rand(3, 3, 2, seed=2), _rand(2, seed=3, scale=1.5))
    return policy, rm


# --------------------------------------------------------------------------------------------- interfaces
def test_tabular_policy_and_linear_rm(small):
    policy, rm = small
    th = policy.theta_init()
    _close(th["logits"], policy.ref_logits, 0)
    th["logits"] += 1.0  # theta_init hands out a copy: the reference stays put
    _close(policy.theta_init()["logits"], policy.ref_logits, 0)
    b = toy_batch([0, 2, 1], [1, 0, 2])
    assert len(b) == 3
    _close(policy.logprobs(b), torch.log_softmax(policy.ref_logits, -1)[[0, 2, 1], [1, 0, 2]], 1e-15)
    theta = {"logits": _rand(3, 3, seed=9)}
    _close(policy.logprobs(b, theta), torch.log_softmax(theta["logits"], -1)[[0, 2, 1], [1, 0, 2]], 1e-15)
    enc = rm.encode([0, 2], [1, 1])
    _close(rm.forward_encoded(enc), rm.rewards_table()[[0, 2], [1, 1]], 1e-15)
    assert isinstance(rm.phi, torch.nn.Parameter)
    rm.forward_encoded(enc).sum().backward()
    _close(rm.phi.grad, rm.features[[0, 2], [1, 1]].sum(0), 1e-15)


def test_human_pairs_follow_the_human_reward():
    human = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.0, 0.5]], dtype=DT)
    pairs = human_pairs(human, [0, 1])
    assert len(pairs) == 6
    for x, w, lo in pairs:
        assert human[x, w] > human[x, lo]
    # drawn from Bradley-Terry: with a huge margin the winner is almost surely the better response
    g = torch.Generator().manual_seed(0)
    noisy = human_pairs(100 * human, [0, 1], generator=g)
    assert sorted(noisy) == sorted(pairs)


def test_builders_make_core_objects(small):
    policy, rm = small
    s = make_samples(policy, rm, [0, 2], [[1, 1, 0], [2, 0, 0]])
    assert s.n == 3 and s.num_prompts == 2 and len(s.batch) == 6
    assert s.batch.x.tolist() == [0, 0, 0, 2, 2, 2] and s.batch.y.tolist() == [1, 1, 0, 2, 0, 0]
    _close(s.ref_logp, s.behaviour_logp, 0)  # default behaviour policy: pi_ref (the sample bank)
    q = make_preference_batch(policy, rm, [(0, 1, 2), (1, 0, 2)])
    assert q.num_pairs == 2
    _close(q.ref_logp, policy.logprobs(toy_batch([0, 1, 0, 1], [1, 0, 2, 2])), 0)
    task = make_task("d", policy, rm, [0, 1], [(0, 1, 2)], inner_steps=3, n=2, generator=torch.Generator())
    assert len(task.inner) == 3 and all(len(t.batch) == 4 for t in task.inner)


# ----------------------------------------------------------------------------------------- inner problem
def test_exact_inner_gradient_matches_autograd(small):
    policy, rm = small
    r = rm.rewards_table().detach()
    logits = _rand(3, 3, seed=5)
    for prompts, beta in [([0, 1, 2], 0.3), ([2, 0], 1.7), ([1, 1, 2], 0.05)]:
        th = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(inner_objective(th, policy.ref_logits, r, beta, prompts), [th])
        _close(exact_inner_gradient(logits, policy.ref_logits, r, beta, prompts), g, 1e-13)


@pytest.mark.parametrize("n", [2, 3])
def test_rloo_expectation_equals_exact_gradient(small, n):
    """E over all Y^n sample tuples of the core's RLOO estimate == the exact gradient of L_in, on-policy at theta_ref,
    on-policy at theta != theta_ref, and off-policy from pi_ref with (unclipped) importance weights."""
    policy, rm = small
    r = rm.rewards_table().detach()
    beta, prompts = 0.4, [0, 2]
    theta = policy.ref_logits + _rand(3, 3, seed=7, scale=0.8)
    for logits, behaviour in [(policy.ref_logits, None), (theta, None), (theta, policy.ref_logits)]:
        exp = expected_rloo_gradient(policy, r, logits, prompts, n, beta, behaviour_logits=behaviour)
        _close(exp, exact_inner_gradient(logits, policy.ref_logits, r, beta, prompts))
    # clipped importance weights are biased: the check above can fail
    clipped = expected_rloo_gradient(policy, r, theta, prompts, n, beta, behaviour_logits=policy.ref_logits,
                                     clip=1.0)
    assert (clipped - exact_inner_gradient(theta, policy.ref_logits, r, beta, prompts)).abs().max() > 1e-3


def test_rloo_single_tuple_by_hand(small):
    """One tuple, written out: g = -1/(Bn) sum_j A_j (e_{y_j} - pi), A_j = R_j - mean_{i != j} R_i."""
    policy, rm = small
    r = rm.rewards_table().detach()
    beta = 0.25
    theta = policy.ref_logits + _rand(3, 3, seed=11, scale=0.5)
    s = make_samples(policy, rm, [1], [[0, 2, 2]], behaviour_logits=theta)
    th = {"logits": theta.clone().requires_grad_()}
    g, _ = policy_gradient(lambda p: policy.logprobs(s.batch, p), th, r[1, [0, 2, 2]], s.ref_logp,
                           s.behaviour_logp, beta, 3)
    pi = torch.softmax(theta[1], -1)
    R = r[1, [0, 2, 2]] - beta * (torch.log(pi) - torch.log_softmax(policy.ref_logits[1], -1))[[0, 2, 2]]
    A = torch.stack([R[j] - (R.sum() - R[j]) / 2 for j in range(3)])
    want = torch.zeros(3, 3, dtype=DT)
    for j, y in enumerate([0, 2, 2]):
        want[1] += -A[j] * (torch.eye(3, dtype=DT)[y] - pi) / 3
    _close(g["logits"], want, 1e-14)


def test_kl_optimum_and_bt_collapse(small):
    """pi* = pi_ref exp(r/beta)/Z is stationary for L_in, minimises it, gradient descent finds it, and
    L_out(pi*) (the core's outer loss) equals plain Bradley-Terry of r on the pairs, whatever beta."""
    policy, rm = small
    r = rm.rewards_table().detach()
    pairs = [(0, 1, 2), (0, 0, 1), (1, 2, 0), (2, 0, 2), (2, 1, 0)]
    q = make_preference_batch(policy, rm, pairs)
    for beta in (0.05, 0.5, 2.0):
        star = kl_optimal_logits(policy.ref_logits, r, beta)
        _close(exact_inner_gradient(star, policy.ref_logits, r, beta, [0, 1, 2]), torch.zeros(3, 3), 1e-12)
        best = float(inner_objective(star, policy.ref_logits, r, beta, [0, 1, 2]))
        for seed in range(5):
            other = star + _rand(3, 3, seed=seed, scale=0.3)
            assert float(inner_objective(other, policy.ref_logits, r, beta, [0, 1, 2])) > best
        # closed form of the optimum: min L_in = -beta mean_x log E_ref exp(r/beta)
        lse = torch.logsumexp(torch.log_softmax(policy.ref_logits, -1) + r / beta, -1)
        _close(best, -beta * lse.mean(), 1e-12)
        L_out = outer_loss(policy, {"logits": star}, q, beta)
        bt = bradley_terry_loss(rm.forward_encoded(q.rm_chosen), rm.forward_encoded(q.rm_rejected))
        _close(L_out, bt, 1e-12)
        _close(L_out, pairs_bt_loss(r, pairs), 1e-12)
    # exact gradient descent on L_in converges to pi*
    beta, th = 2.0, policy.ref_logits.clone()
    for _ in range(3000):
        th = th - 2.0 * exact_inner_gradient(th, policy.ref_logits, r, beta, [0, 1, 2]) * 3
    _close(torch.log_softmax(th, -1), kl_optimal_logits(policy.ref_logits, r, beta), 1e-9)


# ---------------------------------------------------------------------------------------- hypergradient
def _tasks(policy, rm, K, seed, n=3, prompts=((0, 1), (2, 0))):
    g = torch.Generator().manual_seed(seed)
    pairs = [[(0, 1, 2), (1, 0, 2)], [(2, 2, 1), (0, 0, 1), (2, 0, 1)]]
    return [make_task(f"d{i}", policy, rm, list(p), pairs[i], inner_steps=K, n=n, generator=g)
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("mode", ["one-step", "truncated", "unrolled"])
@pytest.mark.parametrize("lambda_bt", [0.0, 0.3])
def test_hypergradient_K1_closed_form(small, mode, lambda_bt):
    """At K = 1 every mode equals the hand-derived hypergradient alpha/(Bn) sum_j s~_j f(x_j, y_j) (+ BT term)."""
    policy, rm = small
    tasks = _tasks(policy, rm, 1, seed=0)
    alpha, beta = 1.7, 0.6
    meta, rloo = core_configs(1, alpha, beta, 3, 5.0, mode, lambda_bt)
    for task in tasks:
        rewards = [rm.forward_encoded(s.rm_encoding).detach() for s in task.inner]
        got, loss, _ = reward_value_grads(policy, task, rewards, meta, rloo)
        want, want_loss = closed_form_value_grads(policy, task, rewards, alpha, beta, 5.0, mode)
        _close(got[0], want[0], 1e-12)
        _close(loss, want_loss, 1e-12)
    rm.zero_grad()
    meta_gradient(policy, rm, tasks, meta, rloo)
    want, F = closed_form_meta_gradient(policy, rm.features, rm.phi, tasks, alpha, beta, 5.0, mode, lambda_bt)
    _close(rm.phi.grad, want, 1e-12)
    _close(meta_objective(policy, rm, tasks, meta, rloo), F, 1e-12)
    assert np.abs(want).max() > 1e-4  # not a vacuous comparison


def test_truncated_equals_unrolled_at_K1_and_differs_at_K2(small):
    policy, rm = small
    grads = {}
    for K in (1, 2):
        tasks = _tasks(policy, rm, K, seed=1)
        for mode in ("truncated", "unrolled"):
            meta, rloo = core_configs(K, 2.0, 0.5, 3, 5.0, mode)
            rm.zero_grad()
            meta_gradient(policy, rm, tasks, meta, rloo)
            grads[K, mode] = rm.phi.grad.clone()
    _close(grads[1, "truncated"], grads[1, "unrolled"], 1e-12)
    assert (grads[2, "truncated"] - grads[2, "unrolled"]).abs().max() > 1e-4


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("clip", [None, 1.1])
def test_hypergradient_multistep_closed_form(small, K, clip):
    """K > 1: `truncated` and exact `unrolled` against the hand derivation (unrolled: u_k = (I - alpha J_k)^T u_{k+1},
    J the derivative of the RLOO step in theta through importance weights, KL term and grad log pi); clip = 1.1
    clips some importance weights."""
    policy, rm = small
    tasks = _tasks(policy, rm, K, seed=2)
    alpha, beta = 2.0, 0.5
    for mode in ("truncated", "unrolled"):
        meta, rloo = core_configs(K, alpha, beta, 3, clip, mode, 0.2)
        rm.zero_grad()
        meta_gradient(policy, rm, tasks, meta, rloo)
        want, F = closed_form_meta_gradient(policy, rm.features, rm.phi, tasks, alpha, beta, clip, mode, 0.2)
        _close(rm.phi.grad, want, 1e-12)
        _close(meta_objective(policy, rm, tasks, meta, rloo), F, 1e-12)


def test_unrolled_closed_form_matches_finite_differences(small):
    """The hand-derived unrolled hypergradient is the derivative of F(phi) for fixed samples (K = 2)."""
    policy, rm = small
    tasks = _tasks(policy, rm, 2, seed=3)
    alpha, beta, eps = 2.0, 0.5, 1e-6
    want, _ = closed_form_meta_gradient(policy, rm.features, rm.phi, tasks, alpha, beta, None, "unrolled", 0.1)
    meta, rloo = core_configs(2, alpha, beta, 3, None, "unrolled", 0.1)
    fd = np.zeros_like(want)
    for i in range(len(fd)):
        vals = []
        for sgn in (1, -1):
            phi = rm.phi.detach().clone()
            phi[i] += sgn * eps
            vals.append(meta_objective(policy, LinearRM(rm.features, phi), tasks, meta, rloo))
        fd[i] = (vals[0] - vals[1]) / (2 * eps)
    assert np.abs(fd - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    assert np.abs(want).max() > 1e-3


# --------------------------------------------------------------------- exact expected objective (theory.py)
def _enumerate_domain(problem, rm, d, K, n, meta, rloo):
    """E over every joint sample set of domain d of (core meta_objective, core meta_gradient)."""
    prompts = problem.domains[d]
    ref = problem.policy.log_probs_table()
    Y = problem.policy.num_responses
    per_step = list(itertools.product(range(Y), repeat=n * len(prompts)))
    F, G, total_p = 0.0, torch.zeros_like(rm.phi), 0.0
    for steps in itertools.product(per_step, repeat=K):
        responses = [torch.tensor(s).reshape(len(prompts), n) for s in steps]
        prob = math.exp(sum(float(ref[x, r].sum()) for resp in responses for x, r in zip(prompts, resp)))
        task = make_task("d", problem.policy, rm, prompts, problem.pairs[d], responses=responses)
        F += prob * meta_objective(problem.policy, rm, [task], meta, rloo)
        rm.zero_grad()
        meta_gradient(problem.policy, rm, [task], meta, rloo)
        G += prob * rm.phi.grad
        total_p += prob
    assert abs(total_p - 1) < 1e-12
    return F, G


@pytest.mark.parametrize("K,prompts_per_domain,clip", [(1, 2, None), (2, 1, 1.2)])
def test_exact_meta_objective_is_the_core_averaged_over_all_samples(K, prompts_per_domain, clip):
    """toy.exact_meta_objective and its autograd gradient == the probability-weighted average of the core's
    meta_objective / unrolled meta_gradient over every joint sample set (the unrolled estimate is unbiased)."""
    problem = make_problem(seed=4, num_domains=2, prompts_per_domain=prompts_per_domain, num_responses=3,
                           num_features=2)
    phi = _rand(2, seed=5, scale=1.5)
    rm = problem.rm(phi)
    n, alpha, beta, lam = 2, 2.0, 0.7, 0.1
    meta, rloo = core_configs(K, alpha, beta, n, clip, "unrolled", lam)
    F, G = 0.0, torch.zeros(2, dtype=DT)
    for d in range(len(problem.domains)):
        f, g = _enumerate_domain(problem, rm, d, K, n, meta, rloo)
        F, G = F + f / 2, G + g / 2
    _close(float(exact_meta_objective(problem, rm, K, n, alpha, beta, clip, lam)), F)
    grad, val = exact_hypergradient(problem, phi, K, n, alpha, beta, clip, lam)
    _close(val, F)
    _close(grad, G)
    assert grad.abs().max() > 1e-3
    if K > 1:  # the truncated estimate is biased for grad F
        meta_t, _ = core_configs(K, alpha, beta, n, clip, "truncated", lam)
        Gt = sum(_enumerate_domain(problem, rm, d, K, n, meta_t, rloo)[1] / 2 for d in range(2))
        assert (Gt - grad).abs().max() > 1e-4


def test_beta_only_rescales_phi_at_K1():
    """At K = 1 the inner step starts at theta_ref, where the KL term of R_j is 0, so theta_1 - theta_ref is linear in
    phi, and L_out depends on theta_1 only through beta * (log-ratio differences of two responses of one prompt),
    which are linear in theta_1 (the normaliser cancels): F_beta(phi) = F_1(beta phi) exactly. Not so at K > 1."""
    problem = make_problem(seed=1, num_responses=3)
    phi = _rand(3, seed=2, scale=2.0)
    vals = {K: [float(exact_meta_objective(problem, problem.rm(phi / b), K, 2, 1.0, b, 5.0)) for b in (0.1, 0.5, 2.0)]
            for K in (1, 2)}
    _close(vals[1], [vals[1][0]] * 3, 1e-12)
    assert max(vals[2]) - min(vals[2]) > 1e-3
    # the same for fixed samples through the core (the toy RM's encodings are feature rows, independent of phi)
    tasks = [make_task("d", problem.policy, problem.rm(), problem.domains[0], problem.pairs[0], inner_steps=1, n=2,
                       generator=torch.Generator().manual_seed(0))]
    F = [meta_objective(problem.policy, problem.rm(phi / b), tasks, *core_configs(1, 1.0, b, 2, 5.0))
         for b in (0.1, 2.0)]
    _close(F[0], F[1], 1e-12)


# --------------------------------------------------------------------------------------- theory smoke
def test_run_theory_smoke(tmp_path):
    from oodpl.toy.theory import run_theory

    out = tmp_path / "theory"
    res = run_theory(out, betas=(0.1, 1.0), inner_steps=(1, 2), outer_iters=4, seeds=1, workers=1)
    data = json.loads((out / "results.json").read_text())
    png = (out / "theory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "theory.png"]  # no temporaries left
    assert data["config"]["betas"] == [0.1, 1.0] and data["config"]["inner_steps"] == [1, 2]
    assert len(data["runs"]) == 4 and len(data["summary"]) == 4
    for run in data["runs"]:
        assert len(run["grad_norm_sq"]) == 4 and len(run["running_avg"]) == 4
        _close(run["running_avg"], np.cumsum(run["grad_norm_sq"]) / np.arange(1, 5), 1e-12)
        assert all(v >= 0 and math.isfinite(v) for v in run["grad_norm_sq"] + run["stochastic_grad_norm_sq"])
        assert run["hypergrad"] == ("one-step" if run["inner_steps"] == 1 else "truncated")
    for s in data["summary"]:
        assert {"beta", "inner_steps", "running_avg_mean", "relative_running_avg_mean", "final_running_avg",
                "objective_final", "pair_accuracy_final"} <= set(s)
    assert set(data["trends"]) >= {"running_avg_decreases_in_T", "larger_beta_lowers_running_avg",
                                   "larger_beta_lowers_relative_running_avg"}
    assert res["summary"] == data["summary"]
    # the first recorded value is the exact hypergradient at phi_0
    from oodpl.toy.problem import make_problem as mk

    run = data["runs"][0]
    problem = mk(data["config"]["problem_seed"], **data["config"]["problem"])
    phi0 = data["config"]["init_scale"] * torch.randn(problem.features.shape[-1],
                                                      generator=torch.Generator().manual_seed(1000), dtype=DT)
    g, _ = exact_hypergradient(problem, phi0, run["inner_steps"], data["config"]["num_samples"],
                               data["config"]["inner_lr"], run["beta"], data["config"]["importance_clip"])
    _close(run["grad_norm_sq"][0], float(g.pow(2).sum()), 1e-12)
