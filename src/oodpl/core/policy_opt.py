"""KL-regularised RLOO policy optimisation: ONE implementation shared by the inner loop of meta-training and by the
meta-test optimiser (method.md, "Inner problem", "Reward standardisation" and "Meta-test").

    r^_j = r(x, y_j) / s          s: std of the step's rewards (inner step, differentiable) or a fixed scale (meta-test)
    R_j = r^_j - beta * (log pi_theta(y_j|x) - log pi_ref(y_j|x))
    A_j = R_j - mean_{i != j} R_i
    g   = - 1/(B n) sum_x sum_j w_j A_j grad_theta log pi_theta(y_j|x)

w_j = pi_theta(y_j|x) / pi_behaviour(y_j|x) (clipped) are importance weights; they are 1 for on-policy samples and
for bank samples at theta_0 = theta_ref.

Demonstrations (method.md, "Demonstrations in the inner step"): M human continuations y_m of support prompts add a
reward-weighted likelihood term, with their rewards standardised over that set (they have no baseline of their own):

    r^_m = (r_m - mean r) / s          g_demo = - 1/M sum_m r^_m grad_theta log pi_theta(y_m|x_m)
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from oodpl.core.objectives import kl_k1, rloo_advantages

LogprobFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
RewardScale = Union[str, float, None]  # "batch": divide by the batch's reward std; a number: by it; None: raw rewards

SCALE_FLOOR = 1e-6  # a batch whose rewards (nearly) all tie is not blown up: s is floored (and then constant in r)


def batch_reward_scale(rewards: torch.Tensor) -> torch.Tensor:
    """s(r): the population standard deviation of the N rewards of one step (floored at SCALE_FLOOR)."""
    return rewards.std(correction=0).clamp_min(SCALE_FLOOR)


def standardise(rewards: torch.Tensor, scale: RewardScale) -> torch.Tensor:
    """r^ = r / s. With scale="batch", s = batch_reward_scale(r) stays in the graph, so derivatives with respect to the
    reward values carry the chain rule through s (the `unrolled` hypergradient relies on it). The shift needs no
    removal: the RLOO baseline already cancels it."""
    if scale is None:
        return rewards
    if scale == "batch":
        return rewards / batch_reward_scale(rewards)
    return rewards / float(scale)


def pull_back_standardisation(grad_std: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """dL/dr from dL/dr^ for r^ = r / s(r) (scale="batch"), method.md "The hypergradient":

        dL/dr_i = g_i / s - (r_i - mean r) / (N s^3) * sum_j g_j r_j

    where the floor is active s is a constant and only the first term remains."""
    s = rewards.std(correction=0)
    if float(s) < SCALE_FLOOR:
        return grad_std / SCALE_FLOOR
    return grad_std / s - (rewards - rewards.mean()) / (rewards.numel() * s ** 3) * (grad_std * rewards).sum()


def centred_standardise(rewards: torch.Tensor, scale: RewardScale) -> torch.Tensor:
    """r^ = (r - mean r) / s for a set of candidates without a baseline (the demonstrations); s as in `standardise`
    (reward_norm "none": centred only)."""
    return standardise(rewards - rewards.mean(), scale)


def pull_back_centred_standardisation(grad_std: torch.Tensor, rewards: torch.Tensor,
                                      scale: RewardScale) -> torch.Tensor:
    """dL/dr from dL/dr^ for r^ = (r - mean r) / s(r) (`centred_standardise`). Centring is a symmetric projection, so
    its pull-back centres the weights, and s(r) is shift invariant:

        dL/dr_i = (g_i - mean g) / s - (r_i - mean r) / (M s^3) * sum_j g_j (r_j - mean r)"""
    centred = grad_std - grad_std.mean()
    return pull_back_standardisation(centred, rewards) if scale == "batch" else centred


def importance_weights(logp: torch.Tensor, behaviour_logp: torch.Tensor | None, clip: float | None) -> torch.Tensor:
    """pi_theta / pi_behaviour per sample (clipped); exactly 1 for on-policy samples (behaviour_logp None)."""
    if behaviour_logp is None:
        return torch.ones_like(logp)
    w = torch.exp(logp - behaviour_logp)
    return w.clamp(max=clip) if clip else w


def rloo_coefficients(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                      behaviour_logp: torch.Tensor | None, beta: float, n: int, clip: float | None,
                      reward_scale: RewardScale = None) -> torch.Tensor:
    """c_j = - w_j A_j / (B n), so that g = sum_j c_j grad log pi(y_j). Differentiable in rewards and logp."""
    total = standardise(rewards, reward_scale) - beta * kl_k1(logp, ref_logp)
    adv = rloo_advantages(total.reshape(-1, n)).reshape(-1)
    w = importance_weights(logp, behaviour_logp, clip)
    return -(w * adv) / adv.numel()


def policy_gradient(logp_fn: LogprobFn, theta: dict[str, torch.Tensor], rewards: torch.Tensor,
                    ref_logp: torch.Tensor, behaviour_logp: torch.Tensor | None, beta: float, n: int,
                    clip: float | None = None, create_graph: bool = False, reward_scale: RewardScale = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """g_d(theta, r): the RLOO estimate of grad_theta L_in on standardised rewards (`reward_scale`, see
    `standardise`). With create_graph the result stays differentiable in theta and in the reward values (used by the
    `unrolled` hypergradient); otherwise rewards act as constants."""
    logp = logp_fn(theta)
    coef_logp = logp if create_graph else logp.detach()
    coef = rloo_coefficients(rewards, coef_logp, ref_logp, behaviour_logp, beta, n, clip, reward_scale)
    grads = weighted_score(logp, theta, coef, create_graph)
    with torch.no_grad():
        kl = kl_k1(logp, ref_logp)
        std = standardise(rewards.detach(), reward_scale)
        # the spread of pi_theta / pi_behaviour (unclipped): how far the step's policy is from the samples' source
        w = importance_weights(logp, behaviour_logp, None).double()
        stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std(correction=0)),
                 "kl": float(kl.mean()), "objective": float((std - beta * kl).mean()),
                 "iw_std": float(w.std(correction=0)), "iw_max": float(w.max())}
    return grads, stats


def demonstration_gradient(logp_fn: LogprobFn, theta: dict[str, torch.Tensor], rewards: torch.Tensor,
                           create_graph: bool = False, reward_scale: RewardScale = None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """g_demo(theta, r) = - 1/M sum_m r^_m grad_theta log pi_theta(y_m|x_m), r^ = `centred_standardise`(r). Linear
    in the standardised rewards; with create_graph differentiable in theta and in the reward values."""
    logp = logp_fn(theta)
    coef = -centred_standardise(rewards, reward_scale) / rewards.numel()
    r = rewards.detach()
    stats = {"demo_reward": float(r.mean()), "demo_reward_std": float(r.std(correction=0))}
    return weighted_score(logp, theta, coef, create_graph), stats


def weighted_score(logp: torch.Tensor, theta: dict[str, torch.Tensor], coef: torch.Tensor,
                   create_graph: bool = False) -> dict[str, torch.Tensor]:
    """sum_j c_j grad_theta log pi_j in one backward pass: a vector-Jacobian product with c as the output cotangent."""
    grads = torch.autograd.grad(logp, list(theta.values()), grad_outputs=coef, create_graph=create_graph,
                                allow_unused=True)
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(theta.items(), grads)}


def sgd_step(theta: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """theta_{k+1} = theta_k - alpha * g (functional; keeps the graph if the inputs have one)."""
    return {k: theta[k] - lr * grads[k] for k in theta}
