"""Frozen trunk: one meta step (bilevel.meta_gradient, K = 1) with adapters on the top L = 4 of 30 layers (cached trunk)
against the same step at full depth, and against one BT step + one RLOO step on the same batch.

    python perf/bench_trunk.py [--reps 2] [--layers 4]

Default models and sizes (oodpl.config defaults: SmolLM2-135M, MiniLM RM, B = 8 prompts x n = 4 samples, 16 query pairs
per domain, meta-batch of 2 domains). Both policies read the SAME bank samples and query pairs; the trunk-cached one
computed its trunk once when the bank / query sets were built (timed separately, reported as a one-off cost).

- meta (full / trunk): bank reads (SampleBank.select, PreferenceSet.select with RM tokenisation) + meta_gradient +
  clipping + Adam on phi, exactly as in one outer step of meta-training.
- baseline: one Bradley-Terry step on the step's query pairs + one on-policy RLOO step on its prompts
  (metatest.optimise_policy with meta_test.steps = 1: generation, log pi_ref, RM scoring, policy step), full depth.

Ratios printed: full / trunk (target >= 3), trunk / baseline, full / baseline.
"""

from __future__ import annotations

import dataclasses
import os
import time

import _common as C


def main():
    p = C.parser(__doc__.splitlines()[0], reps=2)
    p.add_argument("--layers", type=int, default=4, help="trainable top layers of the cached side (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import torch

    from oodpl.core.bilevel import DomainTask, meta_gradient
    from oodpl.data.split import build_split
    from oodpl.adapt.metatest import optimise_policy, reward_model_fn
    from oodpl.train.metatrain import build_query_sets, draw_tasks
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.core.objectives import bradley_terry_loss
    from oodpl.models.sampling import build_bank

    cfg = C.default_config()
    cfg.data.max_domains = cfg.meta.meta_batch_domains  # every domain drawn each step: same batch for all sides
    cfg.meta.bank_size = cfg.rloo.batch_prompts
    full = load_policy(cfg.policy)
    trunk_cfg = dataclasses.replace(cfg.policy, trainable_layers=args.layers)
    cached = load_policy(trunk_cfg)
    rm = load_reward_model(cfg.reward)
    split = build_split(cfg.data)
    names = sorted(split.meta_train)
    pad = full.tokenizer.pad_token_id
    depth = cached.trunk_layer + args.layers
    print(f"policy depth {depth} layers; cached side adapts the top {args.layers} (trunk below layer "
          f"{cached.trunk_layer})", flush=True)

    t0 = time.perf_counter()
    banks = {name: build_bank(full, [x.prompt for x in split.meta_train[name].support_prompts][:cfg.meta.bank_size],
                              cfg.rloo.num_samples, seed=i) for i, name in enumerate(names)}
    bank_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trunk_banks = {name: dataclasses.replace(b).for_policy(cached) for name, b in banks.items()}
    bank_trunk_s = time.perf_counter() - t0
    queries = build_query_sets(full, split)
    t0 = time.perf_counter()
    trunk_queries = build_query_sets(cached, split)
    query_trunk_s = time.perf_counter() - t0
    print(f"bank (generation) {bank_s:.1f}s; one-off trunk of the bank {bank_trunk_s:.1f}s, query sets with trunk "
          f"{query_trunk_s:.1f}s", flush=True)

    params = [q for q in rm.model.parameters() if q.requires_grad]
    meta_opt = torch.optim.Adam(params, lr=cfg.meta.outer_lr)
    drawn = draw_tasks(1, cfg, names, banks, queries)

    def meta_step(policy, bks, qs):
        def run():
            tasks = [DomainTask(n, [bks[n].select(b, pad, rm) for b in inner], qs[n].select(q, pad, rm))
                     for n, inner, q in drawn]
            meta_opt.zero_grad(set_to_none=False)
            out = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn))
            torch.nn.utils.clip_grad_norm_(params, cfg.meta.grad_clip or float("inf"))
            meta_opt.step()
            return out
        return run

    bt_opt = torch.optim.AdamW(params, lr=cfg.train_rm.lr)
    reward_fn = reward_model_fn(rm)
    prompts = [banks[n].prompts[i] for n, inner, _ in drawn for b in inner for i in b]
    rl_cfg = dataclasses.replace(cfg, meta_test=dataclasses.replace(cfg.meta_test, steps=1),
                                 rloo=dataclasses.replace(cfg.rloo, batch_prompts=len(prompts), reward_norm="none"))

    def baseline():
        pairs = [(queries[n].prompts[i], queries[n].chosen[i], queries[n].rejected[i]) for n, _, q in drawn for i in q]
        enc_c = rm.encode([a for a, _, _ in pairs], [b for _, b, _ in pairs])
        enc_r = rm.encode([a for a, _, _ in pairs], [c for _, _, c in pairs])
        bt_opt.zero_grad(set_to_none=True)
        bradley_terry_loss(rm.forward_encoded(enc_c), rm.forward_encoded(enc_r)).backward()
        bt_opt.step()
        optimise_policy(full, prompts, reward_fn, rl_cfg, cfg.rloo.beta, seed=0)
        full.reset_to_reference()

    outs = {}
    times = C.alternate({"meta_full": meta_step(full, banks, queries),
                         f"meta_trunk_L{args.layers}": meta_step(cached, trunk_banks, trunk_queries),
                         "bt_plus_rloo": baseline}, reps=args.reps, warmup=args.warmup,
                        on_result=lambda n, o: outs.setdefault(n, o))
    m = {k: C.median(v) for k, v in times.items()}
    tr = m[f"meta_trunk_L{args.layers}"]
    res = {"benchmark": "trunk", "layers": args.layers, "depth": depth, "meta_batch_domains": len(drawn),
           "batch_prompts": cfg.rloo.batch_prompts, "samples_per_prompt": cfg.rloo.num_samples,
           "query_batch": cfg.meta.query_batch, "times_s": {k: C.stats(v) for k, v in times.items()},
           "one_off_s": {"bank_generation": bank_s, "bank_trunk": bank_trunk_s, "query_sets_with_trunk": query_trunk_s},
           "ratio_full_over_trunk": m["meta_full"] / tr, "ratio_trunk_over_baseline": tr / m["bt_plus_rloo"],
           "ratio_full_over_baseline": m["meta_full"] / m["bt_plus_rloo"], "target": "full / trunk >= 3",
           "load_average_1_5_15": list(os.getloadavg()), "peak_rss_mb": C.peak_rss_mb(),
           "outer_loss": {k: v.get("outer_loss") for k, v in outs.items() if isinstance(v, dict)}}
    print(f"median: meta full {m['meta_full']:.2f}s | meta trunk L={args.layers} {tr:.2f}s | BT+RLOO "
          f"{m['bt_plus_rloo']:.2f}s")
    print(f"ratios: full / trunk = {res['ratio_full_over_trunk']:.2f} (target >= 3); trunk / (BT+RLOO) = "
          f"{res['ratio_trunk_over_baseline']:.2f}; full / (BT+RLOO) = {res['ratio_full_over_baseline']:.2f}; "
          f"load average {res['load_average_1_5_15']}")
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
