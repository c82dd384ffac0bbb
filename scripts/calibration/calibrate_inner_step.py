"""How long is one inner step? KL(pi_theta1 || pi_ref) after one standardised RLOO step, per inner_lr (alpha).

    python scripts/calibration/calibrate_inner_step.py --config configs/evidence.yaml [--alphas 1 0.1 0.01 0.001]

Standardised rewards have unit spread whatever the reward model, so the step's length is set by alpha and the policy's
log-probability gradients, not by the RM (a freshly initialised head serves). For each alpha the step is taken on a
meta-train domain's pi_ref bank (the exact inner step of meta-training), and its KL is measured on FRESH on-policy
samples of pi_theta1 (k1 estimate, unbiased), together with the bank estimate the meta-training log uses. Meta-train
domains only: no held-out data is read. Choose meta.inner_lr so that the step is a small move (KL well below 1 nat).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/evidence.yaml")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    import torch

    from oodpl.core.bilevel import adapted_kl, inner_loop, DomainTask
    from oodpl.config import load_config, with_overrides
    from oodpl.data.split import build_split
    from oodpl.adapt.metatest import draw_eval_samples
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.sampling import build_bank

    cfg = load_config(args.config, args.set)
    split = build_split(cfg.data)
    policy = load_policy(cfg.policy, seed=cfg.seed)
    rm = load_reward_model(cfg.reward, seed=cfg.seed)
    name = sorted(split.meta_train)[0]
    prompts = [x.prompt for x in split.meta_train[name].support_prompts][: args.prompts]
    bank = build_bank(policy, prompts, cfg.rloo.num_samples, seed=0)
    pad = policy.tokenizer.pad_token_id
    samples = bank.select(list(range(len(prompts))), pad, rm)
    with torch.no_grad():
        rewards = [rm.forward_encoded(samples.rm_encoding)]
    task = DomainTask(name, [samples], None)
    print(f"domain {name}: {len(prompts)} prompts x {cfg.rloo.num_samples} samples, trainable_layers "
          f"{cfg.policy.trainable_layers}, reward_norm {cfg.rloo.reward_norm}", flush=True)
    for alpha in args.alphas:
        c = with_overrides(cfg, {"meta.inner_lr": alpha})
        thetas, _ = inner_loop(policy, task, rewards, c.meta, c.rloo)
        bank_kl = adapted_kl(policy, samples, thetas[-1])
        step = float(torch.sqrt(sum(((thetas[1][k] - thetas[0][k]) ** 2).sum() for k in thetas[0])))
        with torch.no_grad():
            for k, prm in policy.trainable_parameters().items():
                prm.copy_(thetas[-1][k])
            fresh = draw_eval_samples(policy, prompts, cfg.rloo.num_samples, seed=1)
            policy.reset_to_reference()
        kl = sum(a - b for a, b in zip(fresh.logp, fresh.ref_logp)) / len(fresh.logp)
        print(f"inner_lr {alpha:g}: ||theta_1 - theta_0|| {step:.4g}, KL on fresh samples {kl:.4g} nats, "
              f"bank estimate {bank_kl:.4g}", flush=True)


if __name__ == "__main__":
    main()
