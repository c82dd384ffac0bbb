"""One meta-training step (K = 1, one-step hypergradient, samples from the bank) vs one Bradley-Terry step plus one
RLOO step on the same batch, with the time split by phase.

    python perf/bench_meta_step.py [--reps 3]

Default models and sizes (oodpl.config defaults): meta-batch of 2 domains, per domain B = 8 bank prompts x n = 4
samples (<= 16 new tokens) and 16 human query pairs; RM max length 128; beta 0.1.

- meta: exactly the body of one outer step of `oodpl.train.metatrain.meta_train`: draw_tasks, bank reads (SampleBank.select
  / PreferenceSet.select, including their RM tokenisation), meta_gradient (phases: rm_forward, inner_policy_steps,
  outer_loss, jvp, rm_backward), grad clipping and the Adam step on phi.
- baseline: the same 2 x 16 query pairs for ONE Bradley-Terry step (the body of rm_train.train_reward_model: tokenise,
  RM forward x 2, backward, AdamW step), plus ONE on-policy RLOO step on the same 2 x 8 prompts, n = 4 (the body of
  metatest.optimise_policy: generation, log pi_ref, decode + RM scoring, policy forward/backward, Adam step).

Ratio (target <= 2.0) = meta step / (BT step + RLOO step). The RLOO step generates its samples, the meta step reads
them from a bank built once per run; two more ratios are therefore reported: with the bank's generation cost for the
samples the step consumes added to the meta step ("bank included": as if the step generated them), and with the
whole bank's build time spread over the default run's outer steps ("bank amortised").
"""

from __future__ import annotations

import time

import _common as C

GROUPS = {  # phase -> report group
    "bank_reads": "generation / bank reads", "generation": "generation / bank reads",
    "inner_policy_steps": "policy forward/backward", "ref_logprobs": "policy forward/backward",
    "policy_fwd_bwd": "policy forward/backward", "jvp": "Jacobian-vector products",
    "rm_forward": "reward model forward/backward", "rm_backward": "reward model forward/backward",
    "rm_score": "reward model forward/backward", "bt_tokenise": "reward model forward/backward",
    "bt_fwd_bwd": "reward model forward/backward", "outer_loss": "outer loss", "optimizer": "optimizer steps",
    "decode": "other", "draw": "other",
}


def main():
    args = C.parser(__doc__.splitlines()[0], reps=3).parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import gc

    import torch

    from oodpl.core.bilevel import DomainTask, meta_gradient
    from oodpl.data.split import build_split
    from oodpl.adapt.metatest import reward_model_fn
    from oodpl.train.metatrain import build_query_sets, draw_tasks
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.core.objectives import bradley_terry_loss
    from oodpl.core.policy_opt import policy_gradient
    from oodpl.runtime.runlog import phase
    from oodpl.models.sampling import build_bank, collate, encode_prompts, policy_logprobs, sample_responses

    cfg = C.default_config()
    policy = load_policy(cfg.policy)
    rm = load_reward_model(cfg.reward)
    split = build_split(cfg.data)
    names = sorted(split.meta_train)
    tok, pc = policy.tokenizer, policy.config
    pad = tok.pad_token_id

    # ---- the sample bank, built once (timed: its cost is reported amortised / included) ----
    bank_times, banks = {}, {}
    for i, name in enumerate(names):
        prompts = [p.prompt for p in split.meta_train[name].support_prompts][: cfg.meta.bank_size or None]
        t0 = time.perf_counter()
        banks[name] = build_bank(policy, prompts, cfg.rloo.num_samples, seed=cfg.seed * 1000 + i)
        bank_times[name] = time.perf_counter() - t0
    bank_samples = sum(len(b.prompts) * b.n for b in banks.values())
    bank_total = sum(bank_times.values())
    print(f"bank: {bank_samples} samples over {len(names)} domains in {bank_total:.1f}s "
          f"({bank_total / bank_samples * 1000:.0f} ms/sample)")
    t0 = time.perf_counter()
    queries = build_query_sets(policy, split)
    query_set_time = time.perf_counter() - t0

    params = [p for p in rm.model.parameters() if p.requires_grad]
    meta_opt = torch.optim.Adam(params, lr=cfg.meta.outer_lr)
    step_counter = iter(range(1, 10**6))

    def meta_step():
        t = {}
        step = next(step_counter)
        with phase(t, "draw"):
            drawn = draw_tasks(step, cfg, names, banks, queries)
        with phase(t, "bank_reads"):
            tasks = [DomainTask(name, [banks[name].select(b, pad, rm) for b in inner], queries[name].select(q, pad, rm))
                     for name, inner, q in drawn]
        meta_opt.zero_grad(set_to_none=False)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn), timings=t)
        with phase(t, "optimizer"):
            torch.nn.utils.clip_grad_norm_(params, cfg.meta.grad_clip or float("inf"))
            meta_opt.step()
        return t, drawn

    # ---- the baseline on the same batch ----
    bt_opt = torch.optim.AdamW(params, lr=cfg.train_rm.lr)
    reward_fn = reward_model_fn(rm)
    pol_params = list(policy.trainable_parameters().values())
    last_drawn = {}

    def baseline_step():
        drawn = last_drawn["d"]
        t = {}
        # one Bradley-Terry step on the meta step's query pairs
        pairs = [(queries[name].prompts[i], queries[name].chosen[i], queries[name].rejected[i])
                 for name, _, q in drawn for i in q]
        with phase(t, "bt_tokenise"):
            enc_c = rm.encode([p for p, _, _ in pairs], [c for _, c, _ in pairs])
            enc_r = rm.encode([p for p, _, _ in pairs], [r for _, _, r in pairs])
        with phase(t, "bt_fwd_bwd"):
            loss = bradley_terry_loss(rm.forward_encoded(enc_c), rm.forward_encoded(enc_r))
            bt_opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase(t, "optimizer"):
            bt_opt.step()
        # one on-policy RLOO step on the meta step's inner prompts (optimise_policy's body)
        chosen = [banks[name].prompts[i] for name, inner, _ in drawn for b in inner for i in b]
        n = cfg.rloo.num_samples
        with phase(t, "generation"):
            policy.reset_to_reference()
            opt = torch.optim.Adam(pol_params, lr=cfg.meta_test.lr)
            p_ids = encode_prompts(tok, chosen, pc.max_prompt_tokens, pc.chat_template)
            policy.model.eval()
            r_ids = sample_responses(policy.model, tok, p_ids, n, pc.max_new_tokens, pc.temperature, pc.top_k,
                                     pc.top_p, batch_size=len(chosen) * n, generator_seed=len(t))
            rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
            rows_r = [r for rs in r_ids for r in rs]
            batch = collate(rows_p, rows_r, pad)
        with phase(t, "ref_logprobs"), torch.no_grad(), policy.reference() as ref:
            ref_logp = policy_logprobs(ref, batch)
        with phase(t, "decode"):
            texts = [tok.decode(r, skip_special_tokens=True) for r in rows_r]
        with phase(t, "rm_score"):
            rewards = reward_fn([p for p in chosen for _ in range(n)], texts).to(ref_logp.dtype)
        with phase(t, "policy_fwd_bwd"):
            grads, _ = policy_gradient(lambda th: policy_logprobs(policy.model, batch), policy.trainable_parameters(),
                                       rewards, ref_logp, None, cfg.rloo.beta, n)
        with phase(t, "optimizer"):
            for p, g in zip(pol_params, grads.values()):
                p.grad = g
            opt.step()
        policy.reset_to_reference()  # (cheap) the meta step's theta_0 stays pi_ref, as in meta-training
        for p in pol_params:
            p.grad = None
        return t

    def run_meta():
        t, drawn = meta_step()
        last_drawn["d"] = drawn
        return t

    phases = {"meta": [], "baseline": []}
    totals = {"meta": [], "baseline": []}
    run_meta(), baseline_step()  # warm-up
    for r in range(args.reps):
        for side in (["meta", "baseline"] if r % 2 == 0 else ["baseline", "meta"]):
            gc.collect()
            t0 = time.perf_counter()
            t = run_meta() if side == "meta" else baseline_step()
            totals[side].append(time.perf_counter() - t0)
            phases[side].append(t)
        print(f"  round {r + 1}/{args.reps}: meta {totals['meta'][-1]:.2f}s, baseline {totals['baseline'][-1]:.2f}s",
              flush=True)

    def phase_medians(rows):
        keys = sorted({k for row in rows for k in row})
        return {k: C.median([row.get(k, 0.0) for row in rows]) for k in keys}

    def grouped(med):
        out = {}
        for k, v in med.items():
            out[GROUPS.get(k, k)] = out.get(GROUPS.get(k, k), 0.0) + v
        return out

    med = {s: phase_medians(phases[s]) for s in phases}
    meta_t, base_t = C.median(totals["meta"]), C.median(totals["baseline"])
    consumed = cfg.meta.meta_batch_domains * cfg.rloo.batch_prompts * cfg.rloo.num_samples * cfg.meta.inner_steps
    per_sample = bank_total / bank_samples
    included = meta_t + consumed * per_sample
    amortised = meta_t + bank_total / cfg.meta.outer_steps
    res = {
        "benchmark": "meta_step", "meta_batch_domains": cfg.meta.meta_batch_domains, "batch_prompts": cfg.rloo.batch_prompts,
        "samples_per_prompt": cfg.rloo.num_samples, "query_batch": cfg.meta.query_batch, "inner_steps": 1,
        "times_s": {k: C.stats(v) for k, v in totals.items()},
        "phase_medians_s": med, "group_medians_s": {s: grouped(m) for s, m in med.items()},
        "bank": {"samples": bank_samples, "build_s": bank_total, "per_sample_s": per_sample,
                 "samples_consumed_per_step": consumed, "query_sets_build_s": query_set_time,
                 "outer_steps_default": cfg.meta.outer_steps},
        "ratio_meta_over_baseline": meta_t / base_t,
        "ratio_bank_included": included / base_t,
        "ratio_bank_amortised_default_run": amortised / base_t,
        "target": "<= 2.0", "peak_rss_mb": C.peak_rss_mb()}
    print(f"median: meta {meta_t:.2f}s, BT+RLOO {base_t:.2f}s; ratio {res['ratio_meta_over_baseline']:.2f} "
          f"(target <= 2.0); bank included {res['ratio_bank_included']:.2f}; bank amortised over "
          f"{cfg.meta.outer_steps} steps {res['ratio_bank_amortised_default_run']:.2f}")
    for s in ("meta", "baseline"):
        print(f"  {s}: " + ", ".join(f"{k} {v:.2f}s" for k, v in res["group_medians_s"][s].items()))
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
