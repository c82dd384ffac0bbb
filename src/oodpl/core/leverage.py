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

With demonstrations in the inner step (meta.inner_candidates: samples+demos) the candidates are the samples plus M
demonstrations, whose rewards the step standardises over their own set and whose term has weight w (demo_weight):

    dL = (alpha / N) sum_j s~_j r^_j + (alpha w / M) sum_m c_m r^_m,     c_m = s_m - mean s (centred JVPs)

Each block is standardised apart, so the largest drop is the sum of the blocks' headrooms, H = H_samples + H_demos
with H_demos = (alpha w / sqrt(M)) ||c|| (the demonstrations are one "prompt" of M candidates, centred plainly);
alignment = -dL / H is the headroom-weighted mean of the blocks' cosines, and a random reward's alignment has spread
sqrt((H_s f_s)^2 + (H_d f_d)^2) / H with f_d = 1 / sqrt(M - 1). The oracle reward is -s~ on the samples and -c on the
demonstrations.

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
    from oodpl.core.policy_opt import batch_reward_scale

    r = rewards.double().reshape(-1)
    scaled = r / batch_reward_scale(r) if reward_norm == "std" else r
    return -alpha / s_tilde.numel() * float((scaled * s_tilde.double()).sum())


def random_floor(num_samples: int, n: int) -> float:
    return 1.0 / math.sqrt(num_samples - num_samples // n)


def oracle_reward(s_tilde: torch.Tensor) -> torch.Tensor:
    """The reward whose standardised values are proportional to -s~ (the largest first-order drop)."""
    return -s_tilde.double()


def step_stats(s_tilde: torch.Tensor, rewards: torch.Tensor, alpha: float, n: int, reward_norm: str = "std",
               demos: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> dict[str, float]:
    """What meta-training logs per inner step: H, the reward's alignment and its first-order drop, and the floor.
    `demos` = (c, demonstration rewards, demo_weight): the step's demonstrations as a second block (module doc); the
    figures are then those of the whole step, with each block's headroom and alignment beside them."""
    samples = {"headroom": headroom(s_tilde, alpha), "alignment": alignment(rewards, s_tilde, n),
               "first_order_drop": first_order_drop(rewards, s_tilde, alpha, reward_norm),
               "alignment_floor": random_floor(s_tilde.numel(), n)}
    if demos is None:
        return samples
    c, demo_rewards, weight = demos
    M = c.numel()
    block = {"headroom": headroom(c, alpha * weight), "alignment": alignment(demo_rewards, c, M),
             "first_order_drop": first_order_drop(demo_rewards, c, alpha * weight, reward_norm),
             "alignment_floor": random_floor(M, M) if M > 1 else 0.0}
    Hs, Hd = samples["headroom"], block["headroom"]
    H = Hs + Hd
    out = {"headroom": H, "first_order_drop": samples["first_order_drop"] + block["first_order_drop"]}
    if H > 0:
        out["alignment"] = (Hs * samples["alignment"] + Hd * block["alignment"]) / H
        out["alignment_floor"] = math.hypot(Hs * samples["alignment_floor"], Hd * block["alignment_floor"]) / H
    else:
        out["alignment"], out["alignment_floor"] = 0.0, samples["alignment_floor"]
    return {**out, "headroom_samples": samples["headroom"], "headroom_demos": block["headroom"],
            "alignment_samples": samples["alignment"], "alignment_demos": block["alignment"]}
