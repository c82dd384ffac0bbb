"""Leverage of the meta-objective (method.md, "Leverage of the meta-objective"): how far an inner step under ANY reward
can move the outer loss, and how much of that a given reward model uses.

For one domain and one inner step at theta_k with N = B*n samples, s~ are the leave-one-out-centred JVPs of the step
(s_j = w_j <grad_theta log pi_theta_k(y_j|x), v>, v = grad_theta L_out(theta_k), as in the hypergradient) and r^ the
standardised rewards (zero mean per prompt, unit population std). To first order the step changes the outer loss by

    dL(r^) = (alpha / N) * sum_j s~_j r^_j

    headroom    H = (alpha / sqrt(N)) * ||s~||      the largest first-order drop any reward can give (r^ ~ -s~)
    alignment   cos(r^, -s~) = -dL(r^) / H          1 for the oracle reward -s~
    floor       1 / sqrt(B (n - 1))                 the spread of a random reward's alignment: per-prompt centring
                                                    leaves B(n-1) directions (method.md quotes ~1/sqrt(N), its
                                                    large-n limit)
    gold        alignment of the gold judge's scores of the same samples

These pure functions are what meta-training logs every outer step (bilevel.reward_value_grads);
bilevel.step_leverage measures all of it for one domain task and a set of named rewards, with the real drop of the
real inner step (the step standardises the reward itself) and its inner KL.
"""

from __future__ import annotations

import math

import torch

SPREAD_FLOOR = 1e-12  # a constant reward (or a zero s~) has no direction: its alignment is 0, not NaN


def per_prompt_centred(values: torch.Tensor, n: int) -> torch.Tensor:
    v = values.reshape(-1, n).double()
    return (v - v.mean(-1, keepdim=True)).reshape(-1)


def standardised(values: torch.Tensor, n: int) -> torch.Tensor:
    """r^: zero mean per prompt (the RLOO baseline removes it anyway), unit population std over the N samples."""
    c = per_prompt_centred(values, n)
    std = c.std(correction=0)
    return c / std if float(std) > SPREAD_FLOOR else torch.zeros_like(c)


def headroom(s_tilde: torch.Tensor, alpha: float) -> float:
    return alpha / math.sqrt(s_tilde.numel()) * float(s_tilde.double().norm())


def alignment(rewards: torch.Tensor, s_tilde: torch.Tensor, n: int) -> float:
    """cos(r^, -s~) = -dL(r^) / H."""
    r_hat, s = standardised(rewards, n), s_tilde.double()
    norm = float(r_hat.norm() * s.norm())
    return float(-(r_hat * s).sum()) / norm if norm > SPREAD_FLOOR else 0.0


def first_order_drop(rewards: torch.Tensor, s_tilde: torch.Tensor, alpha: float, reward_norm: str = "std") -> float:
    """The first-order decrease of the outer loss by the REAL inner step under `rewards` (positive = lower loss):
    -(alpha / N) sum_j s~_j r_j / s(r), with s(r) the step's own standardisation (policy_opt.batch_reward_scale; 1
    for reward_norm "none"). Equals H * alignment when the rewards vary within prompts only; a between-prompt spread
    enlarges s(r) and shortens the step."""
    from .policy_opt import batch_reward_scale

    r = rewards.double().reshape(-1)
    scaled = r / batch_reward_scale(r) if reward_norm == "std" else r
    return -alpha / s_tilde.numel() * float((scaled * s_tilde.double()).sum())


def random_floor(num_samples: int, n: int) -> float:
    return 1.0 / math.sqrt(num_samples - num_samples // n)


def oracle_reward(s_tilde: torch.Tensor) -> torch.Tensor:
    """The reward whose standardised values are proportional to -s~ (the largest first-order drop)."""
    return -s_tilde.double()


def step_stats(s_tilde: torch.Tensor, rewards: torch.Tensor, alpha: float, n: int,
               reward_norm: str = "std") -> dict[str, float]:
    """What meta-training logs per inner step: H, the reward's alignment and its first-order drop, and the floor."""
    return {"headroom": headroom(s_tilde, alpha), "alignment": alignment(rewards, s_tilde, n),
            "first_order_drop": first_order_drop(rewards, s_tilde, alpha, reward_norm),
            "alignment_floor": random_floor(s_tilde.numel(), n)}
