"""Sampling throughput (new tokens per second) of oodpl's generation path, `oodpl.models.sampling.sample_responses`, side by
side with a plain `model.generate` call on the same model, inputs and settings (target: ours / generate >= 1.0).

    python perf/bench_sampling.py [--reps 3] [--new-tokens 16]

Default policy (SmolLM2-135M-Instruct + zero LoRA, float32), sentiment prompts (<= 32 tokens), temperature 1, top-k
off, top-p 1, KV-cached batched generation; batch = 1, 8 and 16 sequences per `generate` call (n = 4 samples per
prompt for batch 8 and 16, i.e. 2 and 4 prompts; batch 1 = 1 prompt x 1 sample). EOS is suppressed so that every
sequence generates exactly --new-tokens tokens (throughput = batch x new tokens / wall time). The batch sizes are
measured alternately in one process. The `generate` side gets its left-padded input tensors built outside the timed
region; ours includes its own collation, the call and the cut of the new tokens into per-prompt lists.
"""

from __future__ import annotations

import _common as C


def main():
    p = C.parser(__doc__.splitlines()[0], reps=3)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import torch

    from oodpl.data.split import build_split
    from oodpl.models.policy import load_policy
    from oodpl.models.sampling import collate, encode_prompts, sample_responses

    cfg = C.default_config()
    policy = load_policy(cfg.policy)
    tok = policy.tokenizer
    split = build_split(cfg.data)
    prompts = [x.prompt for d in sorted(split.meta_train) for x in split.meta_train[d].support_prompts][:4]
    p_ids = encode_prompts(tok, prompts, cfg.policy.max_prompt_tokens)

    class NoEOS:  # a tokenizer view without EOS: fixed-length generation, so tokens/s are comparable
        def __init__(self, t):
            self.eos_token_id, self.pad_token_id = None, t.pad_token_id

    gen_cfg = policy.model.generation_config
    saved_eos = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = None
    notok = NoEOS(tok)
    N = args.new_tokens
    setups = {1: (p_ids[:1], 1), 8: (p_ids[:2], 4), 16: (p_ids[:4], 4)}

    def make(bs):
        ids, n = setups[bs]

        def f():
            out = sample_responses(policy.model, notok, ids, n, N, batch_size=bs, generator_seed=0)
            got = sum(len(r) for rs in out for r in rs)
            assert got == bs * N, (got, bs * N)
            return got
        return f

    def plain_generate(bs):
        ids, n = setups[bs]
        b = collate(ids, [[] for _ in ids], tok.pad_token_id)

        @torch.no_grad()
        def f():
            gen = policy.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, do_sample=True,
                                        num_return_sequences=n, max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0,
                                        pad_token_id=tok.pad_token_id, eos_token_id=None)
            assert gen.shape == (bs, b.input_ids.shape[1] + N)
            return gen
        return f

    sides = {}
    for bs in setups:
        sides[f"ours_batch_{bs}"] = make(bs)
        sides[f"generate_batch_{bs}"] = plain_generate(bs)
    times = C.alternate(sides, args.reps)
    gen_cfg.eos_token_id = saved_eos
    tps = {k: int(k.rsplit("_", 1)[1]) * N / C.median(v) for k, v in times.items()}
    res = {"benchmark": "sampling", "new_tokens": N, "times_s": {k: C.stats(v) for k, v in times.items()},
           "tokens_per_second": tps,
           "ratio_ours_over_generate": {f"batch_{bs}": tps[f"ours_batch_{bs}"] / tps[f"generate_batch_{bs}"]
                                        for bs in setups},
           "target": "ours / generate >= 1.0", "prompt_tokens": [len(x) for x in p_ids],
           "peak_rss_mb": C.peak_rss_mb()}
    for bs in setups:
        print(f"batch {bs:>2}: ours {tps[f'ours_batch_{bs}']:.1f} new tokens/s, generate "
              f"{tps[f'generate_batch_{bs}']:.1f}; ratio {res['ratio_ours_over_generate'][f'batch_{bs}']:.2f}")
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
