"""Meta-test: freeze a reward function, start from pi_ref on a held-out domain, and run the SAME KL-regularised RLOO
policy optimisation as the inner loop of meta-training (policy_opt.policy_gradient), on-policy, for S steps.

The reward function is any callable (prompts, responses) -> scores: a reward-model checkpoint (ours, a baseline's, or
one trained elsewhere: any Hugging Face sequence-classification model) or the gold judge (`gold-reward` baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .models import Policy, RewardModel
from .policy_opt import policy_gradient
from .sampling import collate, encode_prompts, policy_logprobs, sample_responses

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


def reward_model_fn(rm: RewardModel, batch_size: int = 64) -> RewardFn:
    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.cat([rm.score(prompts[i:i + batch_size], responses[i:i + batch_size]).float().cpu()
                          for i in range(0, len(prompts), batch_size)])

    return score


def judge_fn(judge, references: dict[str, str | None] | None = None) -> RewardFn:
    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        refs = [references.get(p) for p in prompts] if references else None
        return torch.tensor(judge.score(prompts, responses, refs), dtype=torch.float32)

    return score


@dataclass
class PolicySamples:
    """Evaluation samples of a policy on a domain's prompts: m responses per prompt, with log pi and log pi_ref."""

    prompts: list[str]  # repeated, one per response
    responses: list[str]
    logp: list[float]
    ref_logp: list[float]

    def to_json(self) -> dict:
        return self.__dict__

    @classmethod
    def from_json(cls, d: dict) -> "PolicySamples":
        return cls(**d)


@torch.no_grad()
def draw_eval_samples(policy: Policy, prompts: list[str], m: int, seed: int, batch_size: int = 16,
                      progress: bool = False, desc: str = "eval samples") -> PolicySamples:
    cfg, tok = policy.config, policy.tokenizer
    p_ids = encode_prompts(tok, prompts, cfg.max_prompt_tokens, cfg.chat_template)
    r_ids = sample_responses(policy.model, tok, p_ids, m, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                             batch_size=batch_size, generator_seed=seed, progress=progress, desc=desc)
    rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
    rows_r = [r for rs in r_ids for r in rs]
    batch = policy.with_trunk(collate(rows_p, rows_r, tok.pad_token_id), batch_size)
    logp = policy_logprobs(policy.model, batch, chunk=batch_size)
    with policy.reference() as ref:
        ref_logp = policy_logprobs(ref, batch, chunk=batch_size)
    return PolicySamples([p for p in prompts for _ in range(m)],
                         [tok.decode(r, skip_special_tokens=True) for r in rows_r], logp.tolist(), ref_logp.tolist())


def optimise_policy(policy: Policy, prompts: list[str], reward_fn: RewardFn, cfg: Config, beta: float, seed: int,
                    progress: bool = False, desc: str = "meta-test", log: Callable | None = None) -> dict:
    """S steps of on-policy KL-regularised RLOO from pi_ref; leaves the optimised policy in `policy`."""
    policy.reset_to_reference()
    theta = policy.trainable_parameters()
    params = list(theta.values())
    mt = cfg.meta_test
    opt = (torch.optim.Adam(params, lr=mt.lr) if mt.optimizer == "adam" else torch.optim.SGD(params, lr=mt.lr))
    tok, pcfg = policy.tokenizer, policy.config
    rng = np.random.default_rng([seed, 7])
    n, B = cfg.rloo.num_samples, min(cfg.rloo.batch_prompts, len(prompts))
    history, t0 = [], time.time()
    bar = tqdm(range(mt.steps), desc=desc, disable=not progress, unit="step", leave=False)
    for step in bar:
        chosen = [prompts[i] for i in rng.choice(len(prompts), size=B, replace=False)]
        p_ids = encode_prompts(tok, chosen, pcfg.max_prompt_tokens, pcfg.chat_template)
        policy.model.eval()
        r_ids = sample_responses(policy.model, tok, p_ids, n, pcfg.max_new_tokens, pcfg.temperature, pcfg.top_k,
                                 pcfg.top_p, batch_size=B * n, generator_seed=seed * 100003 + step)
        rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
        rows_r = [r for rs in r_ids for r in rs]
        # adapters on the top layers only: the trunk below them is shared by pi_theta and pi_ref, computed once
        batch = policy.with_trunk(collate(rows_p, rows_r, tok.pad_token_id))
        with torch.no_grad(), policy.reference() as ref:
            ref_logp = policy_logprobs(ref, batch)
        texts = [tok.decode(r, skip_special_tokens=True) for r in rows_r]
        rewards = reward_fn([p for p in chosen for _ in range(n)], texts).to(ref_logp.dtype)
        grads, stats = policy_gradient(lambda th: policy_logprobs(policy.model, batch), theta, rewards, ref_logp,
                                       None, beta, n)
        for p, g in zip(params, grads.values()):
            p.grad = g
        opt.step()
        history.append({"step": step + 1, **stats})
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        if log is not None:
            log(step + 1, stats)
    return {"history": history, "seconds": time.time() - t0}
