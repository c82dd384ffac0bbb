"""The `dpo` baseline: Direct Preference Optimisation of the LoRA policy on the pooled meta-train pairs.

Same backbone, same trainable part (LoRA adapters, zero-initialised so that pi_theta0 = pi_ref) and same pairs as
`erm-rm`; no reward model and no meta-test optimisation: the trained policy is evaluated on held-out prompts directly.

    L_DPO(theta) = - mean log sigmoid( beta * [(log pi_theta(y_w|x) - log pi_ref(y_w|x))
                                               - (log pi_theta(y_l|x) - log pi_ref(y_l|x))] )

This is `objectives.dpo_loss` (the same function as the outer loss of meta-training), with log pi_ref of every pair
computed once (`bilevel.PreferenceSet`). tests/train/test_dpo.py checks that it equals TRL's `DPOTrainer` loss
(loss_type "sigmoid") on the same batch.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from oodpl.core.bilevel import PreferenceSet
from oodpl.data.records import PairRecord
from oodpl.errors import atomic_write_bytes
from oodpl.models.policy import Policy
from oodpl.core.objectives import dpo_implicit_rewards, dpo_loss
from oodpl.models.sampling import collate, policy_logprobs


def build_preference_set(policy: Policy, pairs: list[PairRecord]) -> PreferenceSet:
    return PreferenceSet.build(policy, [p.prompt for p in pairs], [p.chosen for p in pairs],
                               [p.rejected for p in pairs])


def _batch_logps(policy: Policy, pset: PreferenceSet, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta of the chosen and of the rejected responses of pairs `idx` (one forward pass over 2M rows)."""
    # with a frozen trunk (policy.trainable_layers) the layers below the adapters ran once, when pset was built
    logp = policy_logprobs(policy.model, pset.policy_batch(idx, policy.tokenizer.pad_token_id))
    M = len(idx)
    return logp[:M], logp[M:]


def batch_dpo_loss(policy: Policy, pset: PreferenceSet, idx: list[int], beta: float) -> torch.Tensor:
    lc, lr = _batch_logps(policy, pset, idx)
    return dpo_loss(lc, lr, pset.ref_chosen[idx].to(lc), pset.ref_rejected[idx].to(lc), beta)


@torch.no_grad()
def evaluate_dpo_loss(policy: Policy, pset: PreferenceSet, beta: float, batch_size: int = 32) -> float:
    total, n = 0.0, len(pset)
    for i in range(0, n, batch_size):
        idx = list(range(i, min(n, i + batch_size)))
        total += float(batch_dpo_loss(policy, pset, idx, beta)) * len(idx)
    return total / max(1, n)


@torch.no_grad()
def implicit_reward_scores(policy: Policy, pairs: list[PairRecord], beta: float, batch_size: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO implicit rewards beta * (log pi_theta - log pi_ref) of the chosen and rejected responses of `pairs`."""
    pset = build_preference_set(policy, pairs)
    rc, rr = [], []
    for i in range(0, len(pset), batch_size):
        idx = list(range(i, min(len(pset), i + batch_size)))
        lc, lr = _batch_logps(policy, pset, idx)
        rc.append(dpo_implicit_rewards(lc, pset.ref_chosen[idx].to(lc), beta).cpu())
        rr.append(dpo_implicit_rewards(lr, pset.ref_rejected[idx].to(lr), beta).cpu())
    if not rc:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(rc), torch.cat(rr)


def train_dpo(policy: Policy, pairs: list[PairRecord], beta: float, epochs: int, lr: float, batch_size: int,
              seed: int = 0, progress: bool = False, log=None) -> dict:
    """Adam on theta for `epochs` passes over `pairs` in shuffled minibatches; the trained policy stays in `policy`.

    Returns {"steps", "initial_loss", "final_loss" (full-set DPO loss before / after), "history", "seconds"}."""
    if len(pairs) == 0:
        raise ValueError("DPO needs at least one pair")
    t0 = time.time()
    pset = build_preference_set(policy, pairs)
    params = list(policy.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng([seed, 11])
    initial = evaluate_dpo_loss(policy, pset, beta)
    steps_per_epoch = max(1, -(-len(pset) // batch_size))
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="dpo", disable=not progress, unit="step", leave=False)
    policy.model.eval()  # no dropout (LoRA dropout is 0 too): the loss is a deterministic function of theta
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(pset)).tolist()
        for b in range(steps_per_epoch):
            idx = sorted(order[b * batch_size:(b + 1) * batch_size])
            loss = batch_dpo_loss(policy, pset, idx, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            history.append({"step": step, "dpo_loss": float(loss)})
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if log is not None:
                log(step, {"dpo_loss": float(loss)})
    bar.close()
    final = evaluate_dpo_loss(policy, pset, beta)
    return {"steps": step, "initial_loss": initial, "final_loss": final, "history": history,
            "seconds": time.time() - t0}


def save_trainable(policy: Policy, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in policy.trainable_parameters().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_trainable(policy: Policy, path: str | Path) -> None:
    state = torch.load(path, weights_only=True)
    params = policy.trainable_parameters()
    missing = set(params) - set(state)
    if missing:
        raise ValueError(f"{path} lacks trainable tensors {sorted(missing)[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p))


@torch.no_grad()
def implicit_reward_on_samples(policy: Policy, samples, beta: float, batch_size: int = 32) -> list[float]:
    """beta * (log pi_theta - log pi_ref) of stored policy samples (prompt, response text), re-tokenised the way
    human responses are: the DPO policy's reward for each sample (rm_gold_agreement of dpo)."""
    from oodpl.models.sampling import encode_prompts, encode_responses

    cfg, tok = policy.config, policy.tokenizer
    p_ids = encode_prompts(tok, samples.prompts, cfg.max_prompt_tokens, cfg.chat_template)
    r_ids = encode_responses(tok, samples.prompts, samples.responses, cfg.response_cap(), cfg.chat_template)
    out = []
    for i in range(0, len(p_ids), batch_size):
        batch = collate(p_ids[i:i + batch_size], r_ids[i:i + batch_size], tok.pad_token_id)
        logp = policy_logprobs(policy.model, batch)
        with policy.reference() as ref:
            ref_logp = policy_logprobs(ref, batch)
        out += dpo_implicit_rewards(logp.float(), ref_logp.float(), beta).cpu().tolist()
    return out
