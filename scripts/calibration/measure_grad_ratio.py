"""The two terms of dF/dphi at phi_0 on real models: ||hypergradient|| / ||lambda_bt * grad BT|| (method.md: they must
be of comparable size; the default lambda_bt is set from this ratio, measured on META-TRAIN domains only).

    python scripts/calibration/measure_grad_ratio.py --config configs/evidence.yaml [--draws 3]

phi_0 is the Bradley-Terry RM of the pooled meta-train pairs (meta.init: bt), trained here with the config's train_rm
settings; the ratio is printed per meta-batch draw for the config's lambda_bt, with the lambda_bt that would make it 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/evidence.yaml")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    import tempfile

    from oodpl.core.bilevel import DomainTask, meta_gradient
    from oodpl.config import load_config
    from oodpl.data.split import build_split
    from oodpl.runtime.distributed import make_accelerator
    from oodpl.train.metatrain import build_query_sets, draw_tasks, load_or_build_banks
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.train.rm_train import train_reward_model

    cfg = load_config(args.config, args.set)
    split = build_split(cfg.data)
    policy = load_policy(cfg.policy, seed=cfg.seed)
    rm = load_reward_model(cfg.reward, seed=cfg.seed)
    train_reward_model(rm, split.pooled_pairs(), cfg.train_rm, seed=cfg.seed, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        banks = load_or_build_banks(policy, split, cfg, Path(tmp), make_accelerator(), False)
    queries = build_query_sets(policy, split)
    names = sorted(split.meta_train)
    pad = policy.tokenizer.pad_token_id
    ratios = []
    for step in range(1, args.draws + 1):
        drawn = draw_tasks(step, cfg, names, banks, queries)
        tasks = [DomainTask(n, [banks[n].select(b, pad, rm) for b in inner], queries[n].select(q, pad, rm))
                 for n, inner, q in drawn]
        rm.model.zero_grad()
        st = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo)
        ratios.append(st["grad_ratio"])
        print(f"draw {step}: ||hypergradient|| {st['hypergrad_term_norm']:.4g}, ||lambda_bt grad BT|| "
              f"{st['bt_term_norm']:.4g} (lambda_bt {cfg.meta.lambda_bt:g}), ratio {st['grad_ratio']:.3g}, "
              f"inner reward std {st['inner_reward_std']:.3g}, inner KL after the step {st['inner_kl']:.3g}",
              flush=True)
    med = statistics.median(ratios)
    print(f"median ratio {med:.3g}: lambda_bt = {cfg.meta.lambda_bt * med:.3g} would make it 1")


if __name__ == "__main__":
    main()
