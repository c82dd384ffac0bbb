"""log pi(y|x) of a policy batch: before/after of the `logits_to_keep` change in oodpl.models.sampling.policy_logprobs.

    python perf/bench_logprobs.py [--reps 5]

`legacy` is a verbatim copy of policy_logprobs before the change (LM head and log-softmax over all T positions);
`current` is oodpl.models.sampling.policy_logprobs (LM head on the response positions only). Measured on the default policy
(SmolLM2-135M-Instruct + LoRA) for one RLOO batch (B = 8 prompts x n = 4 samples, prompts <= 32 tokens, responses
<= 16 tokens): no-grad forward (reference log-probs), forward + backward (policy gradient), and the double backward
of the Jacobian-vector product of the bilevel step. Also checks that both give the same values.
"""

from __future__ import annotations

import _common as C


def legacy_policy_logprobs(model, batch, params=None, chunk=None):
    import torch

    from oodpl.models.sampling import sequence_logprobs

    dev = next(model.parameters()).device

    def run(sl):
        kwargs = dict(input_ids=batch.input_ids[sl].to(dev), attention_mask=batch.attention_mask[sl].to(dev),
                      position_ids=batch.position_ids[sl].to(dev), use_cache=False)
        if params is None:
            logits = model(**kwargs).logits
        else:
            logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False).logits
        return sequence_logprobs(logits, kwargs["input_ids"], batch.response_mask[sl].to(dev))

    n = len(batch)
    if chunk is None or chunk >= n:
        return run(slice(None))
    return torch.cat([run(slice(i, i + chunk)) for i in range(0, n, chunk)])


def rloo_batch(policy, cfg, seed=0):
    """One on-policy batch of the default sizes, drawn from pi_ref."""
    import torch

    from oodpl.data.split import build_split
    from oodpl.models.sampling import collate, encode_prompts, sample_responses

    split = build_split(cfg.data)
    name = sorted(split.meta_train)[0]
    prompts = [p.prompt for p in split.meta_train[name].support_prompts][: cfg.rloo.batch_prompts]
    tok, pc = policy.tokenizer, policy.config
    p_ids = encode_prompts(tok, prompts, pc.max_prompt_tokens, pc.chat_template)
    torch.manual_seed(seed)
    r_ids = sample_responses(policy.model, tok, p_ids, cfg.rloo.num_samples, pc.max_new_tokens,
                             batch_size=len(p_ids) * cfg.rloo.num_samples, generator_seed=seed)
    rows_p = [p for p, rs in zip(p_ids, r_ids) for _ in rs]
    rows_r = [r for rs in r_ids for r in rs]
    return collate(rows_p, rows_r, tok.pad_token_id)


def main():
    args = C.parser(__doc__.splitlines()[0], reps=5).parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import torch

    from oodpl.models.policy import load_policy
    from oodpl.models.sampling import policy_logprobs, second_order

    cfg = C.default_config()
    policy = load_policy(cfg.policy)
    batch = rloo_batch(policy, cfg)
    theta = policy.trainable_parameters()
    # a non-zero LoRA B so that the check covers the adapted policy, not only pi_ref
    with torch.no_grad():
        for k, v in theta.items():
            if "lora_B" in k:
                v.normal_(0, 0.01)
    impls = {"legacy": legacy_policy_logprobs, "current": policy_logprobs}

    with torch.no_grad():
        a, b = legacy_policy_logprobs(policy.model, batch), policy_logprobs(policy.model, batch)
    max_abs_diff = float((a - b).abs().max())
    print(f"rows {len(batch)}, T {batch.input_ids.shape[1]}, response tokens <= {int(batch.response_mask.sum(1).max())}"
          f"; max |legacy - current| = {max_abs_diff:.2e}")

    def forward(fn):
        def f():
            with torch.no_grad():
                return fn(policy.model, batch)
        return f

    def fwd_bwd(fn):
        def f():
            logp = fn(policy.model, batch)
            return torch.autograd.grad(logp.sum(), list(theta.values()))
        return f

    tangent = {k: torch.randn_like(v) for k, v in theta.items()}

    def jvp(fn):  # the double-backward JVP of bilevel.logprob_jvp
        def f():
            th = {k: v.detach().requires_grad_() for k, v in theta.items()}
            with second_order():
                logp = fn(policy.model, batch, params=th)
                u = torch.zeros_like(logp, requires_grad=True)
                jt_u = torch.autograd.grad(logp, list(th.values()), grad_outputs=u, create_graph=True)
                return torch.autograd.grad(jt_u, u, grad_outputs=[tangent[k] for k in th])[0]
        return f

    results = {"rows": len(batch), "seq_len": int(batch.input_ids.shape[1]), "max_abs_diff": max_abs_diff}
    for label, make in (("forward_no_grad", forward), ("forward_backward", fwd_bwd), ("jvp_double_backward", jvp)):
        print(label)
        times = C.alternate({k: make(fn) for k, fn in impls.items()}, args.reps)
        results[label] = {k: C.stats(v) for k, v in times.items()}
        results[label]["speedup_legacy_over_current"] = C.median(times["legacy"]) / C.median(times["current"])
        print(f"  -> speed-up {results[label]['speedup_legacy_over_current']:.2f}x")
    results["peak_rss_mb"] = C.peak_rss_mb()
    C.write_json(args.json, {"benchmark": "logprobs", **results})


if __name__ == "__main__":
    main()
