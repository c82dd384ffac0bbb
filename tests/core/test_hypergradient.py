"""The hypergradient of method.md, shown correct: finite differences in float64 on tiny random models."""

import pytest
import torch

from conftest import tiny_tasks
from oodpl.core.bilevel import meta_gradient, meta_objective, reward_value_grads
from oodpl.config import MetaConfig, RLOOConfig
from oodpl.core.objectives import bradley_terry_loss
from oodpl.core.policy_opt import pull_back_standardisation, standardise

RLOO = RLOOConfig(beta=0.1, num_samples=3, importance_clip=None, reward_norm="none")
RLOO_STD = RLOOConfig(beta=0.1, num_samples=3, importance_clip=None, reward_norm="std")


def _grad_and_params(policy, rm, tasks, meta, rloo=RLOO):
    rm.model.zero_grad()
    meta_gradient(policy, rm, tasks, meta, rloo)
    params = [p for p in rm.model.parameters() if p.requires_grad]
    return params, [p.grad.clone() for p in params]


def _directional_fd(policy, rm, tasks, meta, params, direction, eps, rloo=RLOO):
    """Central differences with one Richardson extrapolation step: error O(eps^4) instead of O(eps^2)."""
    coarse = _central(policy, rm, tasks, meta, params, direction, eps, rloo)
    fine = _central(policy, rm, tasks, meta, params, direction, eps / 2, rloo)
    return (4 * fine - coarse) / 3


def _central(policy, rm, tasks, meta, params, direction, eps, rloo=RLOO):
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        f_plus = meta_objective(policy, rm, tasks, meta, rloo)
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        f_minus = meta_objective(policy, rm, tasks, meta, rloo)
        for p, d in zip(params, direction):
            p.add_(eps * d)
    return (f_plus - f_minus) / (2 * eps)


# Standardised rewards divide by the tiny RM's small reward spread: F is much more curved in phi, so its finite
# differences need a smaller step (at eps = 1e-3 the truncation error alone is ~3e-4 relative).
@pytest.mark.parametrize("rloo,eps", [(RLOO, 1e-3), (RLOO_STD, 1e-4)], ids=["raw", "standardised"])
@pytest.mark.parametrize("K,mode,lambda_bt", [(1, "one-step", 0.0), (1, "one-step", 0.5), (2, "unrolled", 0.0),
                                              (1, "unrolled", 0.0)])
def test_hypergradient_matches_finite_differences(tiny64, K, mode, lambda_bt, rloo, eps):
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=K)
    meta = MetaConfig(inner_steps=K, inner_lr=50.0, hypergrad=mode, lambda_bt=lambda_bt)
    params, grad = _grad_and_params(policy, rm, tasks, meta, rloo)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # two random directions in phi-space
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grad, direction)).item()
        numeric = _directional_fd(policy, rm, tasks, meta, params, direction, eps, rloo)
        assert abs(analytic) > 1e-9
        assert abs(analytic - numeric) / abs(numeric) < 1e-4, (analytic, numeric)


def test_standardisation_pull_back_equals_autograd():
    """The closed-form pull-back through r^ = r / s(r) (method.md) against reverse mode through `standardise`."""
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(12, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(12, generator=gen, dtype=torch.float64)
    (auto,) = torch.autograd.grad((standardise(r, "batch") * g).sum(), r)
    assert torch.allclose(pull_back_standardisation(g, r.detach()), auto, rtol=1e-12, atol=1e-14)
    # a constant shift of all rewards changes nothing: the pulled-back weights sum to sum(g)/s, and scaling r by c
    # scales them by 1/c
    assert torch.allclose(pull_back_standardisation(g, r.detach() * 3.0), auto / 3.0, rtol=1e-12)


@pytest.mark.parametrize("rloo", [RLOO, RLOO_STD], ids=["raw", "standardised"])
def test_truncated_equals_unrolled_at_k1(tiny64, rloo):
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    out = {}
    for mode in ("truncated", "unrolled", "one-step"):
        meta = MetaConfig(inner_steps=1, inner_lr=20.0, hypergrad=mode, lambda_bt=0.0)
        out[mode] = _grad_and_params(policy, rm, tasks, meta, rloo)[1]
    for a, b, c in zip(out["truncated"], out["unrolled"], out["one-step"]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-14)
        assert torch.allclose(a, c, rtol=1e-8, atol=1e-14)


def test_truncated_is_an_approximation_at_k2(tiny64):
    """At K = 2 truncated drops the d theta_2 / d theta_1 - I terms: close to, but not equal to, unrolled."""
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=2)
    g = {}
    for mode in ("truncated", "unrolled"):
        meta = MetaConfig(inner_steps=2, inner_lr=50.0, hypergrad=mode, lambda_bt=0.0)
        g[mode] = torch.cat([x.flatten() for x in _grad_and_params(policy, rm, tasks, meta)[1]])
    cos = torch.nn.functional.cosine_similarity(g["truncated"], g["unrolled"], dim=0)
    assert cos > 0.5
    rel = (g["truncated"] - g["unrolled"]).norm() / g["unrolled"].norm()
    assert rel > 1e-4, rel


def test_hypergradient_is_not_bypassed(tiny64):
    """Non-zero, and not a multiple of the plain BT gradient: fails if the bilevel path were silently skipped."""
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    meta = MetaConfig(inner_steps=1, inner_lr=50.0, hypergrad="one-step", lambda_bt=0.0)
    hyper = torch.cat([g.flatten() for g in _grad_and_params(policy, rm, tasks, meta)[1]])
    assert hyper.norm() > 1e-8
    rm.model.zero_grad()
    bt = sum(bradley_terry_loss(rm.forward_encoded(t.query.rm_chosen), rm.forward_encoded(t.query.rm_rejected))
             for t in tasks) / len(tasks)
    bt.backward()
    bt_grad = torch.cat([p.grad.flatten() for p in rm.model.parameters()])
    cos = torch.nn.functional.cosine_similarity(hyper, bt_grad, dim=0).abs()
    assert cos < 0.99


def test_reward_value_grads_are_loo_centred(tiny64):
    """Per prompt the weights dL/dr_j sum to zero: adding a constant to all rewards of a prompt changes nothing."""
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    meta = MetaConfig(inner_steps=1, inner_lr=10.0, hypergrad="one-step", lambda_bt=0.0)
    s = tasks[0].inner[0]
    with torch.no_grad():
        r = rm.forward_encoded(s.rm_encoding)
    grads, _, _ = reward_value_grads(policy, tasks[0], [r], meta, RLOO)
    assert torch.allclose(grads[0].reshape(-1, s.n).sum(-1), torch.zeros(s.num_prompts, dtype=r.dtype), atol=1e-15)


def test_one_outer_step_lowers_the_outer_loss(tiny64):
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    meta = MetaConfig(inner_steps=1, inner_lr=50.0, hypergrad="one-step", lambda_bt=0.1)
    before = meta_objective(policy, rm, tasks, meta, RLOO)
    params, grad = _grad_and_params(policy, rm, tasks, meta)
    step = 1e-2 / torch.sqrt(sum((g ** 2).sum() for g in grad))
    with torch.no_grad():
        for p, g in zip(params, grad):
            p.sub_(step * g)
    after = meta_objective(policy, rm, tasks, meta, RLOO)
    assert after < before


def test_reward_shift_has_zero_hypergradient(tiny64):
    """F is invariant to r_phi + c (RLOO weights are centred, BT uses differences): d F / d bias == 0 exactly."""
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    meta = MetaConfig(inner_steps=1, inner_lr=50.0, hypergrad="one-step", lambda_bt=0.5)
    _grad_and_params(policy, rm, tasks, meta)
    weight = rm.model.classifier.weight.grad.abs().max()
    assert weight > 1e-9
    assert rm.model.classifier.bias.grad.abs().max() < 1e-12 * max(1.0, float(weight))


def test_forward_mode_jvp_equals_double_backward(tiny64):
    from oodpl.core.bilevel import logprob_jvp

    policy, rm = tiny64
    batch = tiny_tasks(policy, rm, K=1)[0].inner[0].batch
    gen = torch.Generator().manual_seed(3)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in policy.theta_init().items()}
    tangent = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}
    lp_f, s_f = logprob_jvp(policy, batch, theta, tangent, method="forward")
    lp_b, s_b = logprob_jvp(policy, batch, theta, tangent, method="double-backward")
    assert torch.allclose(lp_f, lp_b, atol=1e-12)
    assert torch.allclose(s_f, s_b, rtol=1e-9, atol=1e-14)
    assert s_f.abs().max() > 1e-6


def test_one_backward_for_the_meta_batch_equals_one_per_domain(tiny64):
    """meta_gradient(backward=...) (DeepSpeed: one backward per step) gives the per-domain backward's gradient."""
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1, domains=3)
    meta = MetaConfig(inner_steps=1, inner_lr=20.0, hypergrad="one-step", lambda_bt=0.5)
    params, per_domain = _grad_and_params(policy, rm, tasks, meta)
    rm.model.zero_grad()
    calls = []
    meta_gradient(policy, rm, tasks, meta, RLOO, backward=lambda loss: (calls.append(1), loss.backward()))
    assert calls == [1]
    assert any(g.abs().max() > 0 for g in per_domain)
    for a, p in zip(per_domain, params):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-15)


def _scale_head(rm, c):
    with torch.no_grad():
        for p in rm.model.classifier.parameters():
            p.mul_(c)


def test_standardised_meta_objective_is_reward_scale_invariant(tiny64):
    """Inflating the reward scale cannot lower F under standardisation (the confound of the raw inner step)."""
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    meta = MetaConfig(inner_steps=1, inner_lr=50.0, hypergrad="one-step", lambda_bt=0.0)
    f = {}
    for c in (1.0, 7.0):
        _scale_head(rm, c)
        f[c] = (meta_objective(policy, rm, tasks, meta, RLOO_STD), meta_objective(policy, rm, tasks, meta, RLOO))
        _scale_head(rm, 1.0 / c)
    assert f[1.0][0] == pytest.approx(f[7.0][0], rel=1e-9)  # standardised: invariant
    assert abs(f[1.0][1] - f[7.0][1]) > 1e-9  # raw: the scale moves the outer loss


def test_meta_gradient_reports_kl_after_the_step_and_the_term_ratio(tiny64):
    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    meta = MetaConfig(inner_steps=1, inner_lr=50.0, hypergrad="one-step", lambda_bt=0.5)
    rm.model.zero_grad()
    stats = meta_gradient(policy, rm, tasks, meta, RLOO_STD)
    assert stats["inner_kl"] > 0  # KL of theta_1 (before the step, at theta_0 = pi_ref, it is exactly 0)
    assert stats["inner_step_length"] > 0
    ratio = stats["hypergrad_term_norm"] / stats["bt_term_norm"]
    assert stats["grad_ratio"] == pytest.approx(ratio)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in rm.model.parameters() if p.grad is not None))
    assert float(total) <= stats["hypergrad_term_norm"] + stats["bt_term_norm"] + 1e-12  # triangle inequality


def test_outer_loss_before_the_step_is_the_outer_loss_at_pi_ref(tiny64):
    """outer_loss_before = L_out(theta_0): equal to outer_loss when the inner step is zero (inner_lr = 0), equal to a
    direct computation at theta_0, and different from outer_loss after a real step."""
    from oodpl.core.bilevel import outer_loss

    policy, rm = tiny64
    tasks = tiny_tasks(policy, rm, K=1)
    theta0 = {k: v.detach() for k, v in policy.trainable_parameters().items()}
    direct = sum(float(outer_loss(policy, theta0, t.query, RLOO_STD.beta)) for t in tasks) / len(tasks)
    zero = meta_gradient(policy, rm, tasks, MetaConfig(inner_steps=1, inner_lr=0.0, lambda_bt=0.0), RLOO_STD)
    assert zero["outer_loss_before"] == pytest.approx(direct, rel=1e-12)
    assert zero["outer_loss"] == pytest.approx(direct, rel=1e-12)
    step = meta_gradient(policy, rm, tasks, MetaConfig(inner_steps=1, inner_lr=50.0, lambda_bt=0.0), RLOO_STD)
    assert step["outer_loss_before"] == pytest.approx(direct, rel=1e-12)
    assert abs(step["outer_loss"] - direct) > 1e-6


def test_inner_step_effect_is_the_meta_objectives_step_measured(tiny64):
    """inner_step_effect (the left-out diagnostic): its outer loss after the step is F(phi) at lambda_bt = 0, before
    the step it is L_out(theta_0); a zero step changes nothing and has length 0."""
    from oodpl.core.bilevel import inner_step_effect, outer_loss

    policy, rm = tiny64
    [task] = tiny_tasks(policy, rm, K=1)[:1]
    theta0 = {k: v.detach() for k, v in policy.trainable_parameters().items()}
    direct = float(outer_loss(policy, theta0, task.query, RLOO_STD.beta))
    meta = MetaConfig(inner_steps=1, inner_lr=50.0, lambda_bt=0.0)
    eff = inner_step_effect(policy, rm, task, meta, RLOO_STD)
    assert eff["outer_loss_after"] == pytest.approx(meta_objective(policy, rm, [task], meta, RLOO_STD), rel=1e-12)
    assert eff["outer_loss_before"] == pytest.approx(direct, rel=1e-12)
    assert abs(eff["outer_loss_after"] - direct) > 1e-6 and eff["step_length"] > 0 and eff["kl_after"] > 0
    zero = inner_step_effect(policy, rm, task, MetaConfig(inner_steps=1, inner_lr=0.0, lambda_bt=0.0), RLOO_STD)
    assert zero["outer_loss_after"] == pytest.approx(direct, rel=1e-12)
    assert zero["step_length"] == 0.0 and zero["kl_after"] == pytest.approx(0.0, abs=1e-12)
