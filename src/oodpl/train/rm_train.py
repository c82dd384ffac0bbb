"""Ordinary Bradley-Terry reward-model training on pooled pairs (`oodpl train-rm`; the erm-rm and oracle-rm baselines).

A plain loop on purpose: one objective (objectives.bradley_terry_loss), AdamW, accelerate for devices/processes.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from oodpl.config import TrainRMConfig
from oodpl.data.records import PairRecord
from oodpl.runtime.distributed import make_accelerator, prepare_deepspeed, uses_deepspeed
from oodpl.models.reward import RewardModel
from oodpl.core.objectives import bradley_terry_loss, pair_accuracy


def split_eval(pairs: list[PairRecord], fraction: float, seed: int) -> tuple[list[PairRecord], list[PairRecord]]:
    """Hold back `fraction` of each domain's pairs (at least one when the domain has two or more) for accuracy."""
    by_domain: dict[str, list[PairRecord]] = defaultdict(list)
    for p in pairs:
        by_domain[p.domain].append(p)
    rng = random.Random(seed)
    train, held = [], []
    for d in sorted(by_domain):
        items = list(by_domain[d])
        rng.shuffle(items)
        k = int(round(fraction * len(items))) if fraction > 0 else 0
        if fraction > 0 and len(items) >= 2:
            k = max(1, k)
        held += items[:k]
        train += items[k:]
    return train, held


@torch.no_grad()
def score_pairs(rm: RewardModel, pairs: list[PairRecord], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [p.prompt for p in chunk]
        rc.append(rm.score(prompts, [p.chosen for p in chunk]).float().cpu())
        rr.append(rm.score(prompts, [p.rejected for p in chunk]).float().cpu())
    if not rc:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(rc), torch.cat(rr)


def accuracy_by_domain(rm: RewardModel, pairs: list[PairRecord]) -> dict[str, float]:
    rc, rr = score_pairs(rm, pairs)
    out: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        out[p.domain].append(i)
    return {d: pair_accuracy(rc[idx], rr[idx]) for d, idx in sorted(out.items())}


def fit_reward_model(cfg, pairs: list[PairRecord], seed: int, place_on=None, accelerator=None,
                     progress: bool = False, log=None, init_seed: int | None = None,
                     step_loss=None) -> tuple[RewardModel, dict]:
    """THE Bradley-Terry fit of oodpl (erm-rm, oracle-rm, the warm start of meta-training, `oodpl select`'s folds,
    `oodpl train-rm`, the field's RMs): a fresh reward model of cfg.reward (seeded by `init_seed`, default `seed`),
    placed on `place_on`'s device, trained by train_reward_model with cfg.train_rm and data order `seed`.
    `step_loss(rm)` builds the loss of one minibatch (default BTStep: Bradley-Terry alone). Returns the model and the
    training stats."""
    from oodpl.models.reward import load_reward_model
    from oodpl.models.precision import place
    from oodpl.runtime.runlog import seed_everything

    seed_everything(seed)
    rm = load_reward_model(cfg.reward, seed=seed if init_seed is None else init_seed)
    place(rm, place_on)
    stats = train_reward_model(rm, pairs, cfg.train_rm, seed=seed, accelerator=accelerator, progress=progress, log=log,
                               step_loss=(step_loss or BTStep)(rm))
    return rm, stats


class BTStep:
    """The loss of one minibatch of pairs: Bradley-Terry on the RM's rewards of chosen and rejected responses.
    Called as step(model, chunk, device) -> (loss, {name: value to log}); `model` is rm.model as prepared by the
    accelerator. Other methods' steps build on it (field_rms)."""

    def __init__(self, rm: RewardModel):
        self.rm = rm

    def encodings(self, chunk: list[PairRecord]) -> tuple[dict, dict]:
        prompts = [p.prompt for p in chunk]
        return self.rm.encode(prompts, [p.chosen for p in chunk]), self.rm.encode(prompts, [p.rejected for p in chunk])

    @staticmethod
    def rewards(model, enc: dict, device) -> torch.Tensor:
        return model(**{k: v.to(device) for k, v in enc.items()}).logits.squeeze(-1)

    def __call__(self, model, chunk: list[PairRecord], device) -> tuple[torch.Tensor, dict]:
        enc_c, enc_r = self.encodings(chunk)
        loss = bradley_terry_loss(self.rewards(model, enc_c, device), self.rewards(model, enc_r, device))
        return loss, {"bt_loss": float(loss.detach())}


def train_reward_model(rm: RewardModel, pairs: list[PairRecord], cfg: TrainRMConfig, seed: int = 0,
                       accelerator=None, progress: bool = True, log=None, step_loss=None) -> dict:
    """Minimise BT(r_phi; pairs) (or `step_loss`, a BTStep-like callable) with AdamW, minibatches in an order drawn
    from `seed`; returns {"steps", "train_loss", "seconds"}. `log(step, dict)` is called every step when given."""
    step_loss = step_loss or BTStep(rm)
    accelerator = accelerator or make_accelerator()
    model = rm.model
    model.train(False)  # dropout off: the same r_phi the bilevel method and the meta-test see
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    if uses_deepspeed(accelerator):  # ZeRO-1/2; accelerator.backward below also steps, opt.step() is then a no-op
        model, opt = prepare_deepspeed(accelerator, model, opt, grad_clip=0.0)
    else:
        model, opt = accelerator.prepare(model, opt)
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    steps_per_epoch = max(1, (len(pairs) + cfg.batch_size - 1) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    bar = tqdm(total=total, desc="train-rm", disable=not progress or not accelerator.is_main_process, unit="step")
    start, step, losses = time.time(), 0, []
    rank, world = accelerator.process_index, accelerator.num_processes
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][rank::world]  # each process its share
            chunk = [pairs[i] for i in idx] or [pairs[order[0]]]
            loss, logged = step_loss(model, chunk, accelerator.device)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if log is not None:
                log(step, logged)
    bar.close()
    rm.model = accelerator.unwrap_model(model)
    return {"steps": step, "train_loss": sum(losses[-steps_per_epoch:]) / max(1, len(losses[-steps_per_epoch:])),
            "seconds": time.time() - start}
