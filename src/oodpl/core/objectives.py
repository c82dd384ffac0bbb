"""Core objectives of method.md, as plain tensor functions (each tested against hand-computed values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIE_TOL = 1e-9  # the one tie rule: two scores (or a difference and 0) closer than this are a tie


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """BT(r; P) = - mean log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs with r(y_w) > r(y_l); a tie (|difference| < TIE_TOL, the one tie rule) counts one half."""
    diff = (r_chosen - r_rejected).double()
    tie = diff.abs() < TIE_TOL
    return float(torch.where(tie, 0.5, (diff > 0).double()).mean())


def dpo_loss(
    logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """L_out = - mean log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])."""
    return -F.logsigmoid(beta * ((logp_chosen - ref_chosen) - (logp_rejected - ref_rejected))).mean()


def dpo_implicit_rewards(logp: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (logp - ref)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-sample k1 estimate of KL(pi || ref) from samples y ~ pi: log pi(y) - log ref(y) (unbiased, can be < 0)."""
    return logp - ref_logp


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_j = R_j - mean_{i != j} R_i over the last dimension (n samples of one prompt); n >= 2."""
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    total = rewards.sum(-1, keepdim=True)
    return rewards - (total - rewards) / (n - 1)
