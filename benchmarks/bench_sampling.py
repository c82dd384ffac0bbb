"""Sampling throughput (new tokens per second) of oodpl's generation path, `oodpl.sampling.sample_responses`.

    python benchmarks/bench_sampling.py [--reps 3] [--new-tokens 16]

Default policy (SmolLM2-135M-Instruct + zero LoRA, float32), sentiment prompts (<= 32 tokens), temperature 1, top-k
off, top-p 1, KV-cached batched generation; batch = 1, 8 and 16 sequences per `generate` call (n = 4 samples per
prompt for batch 8 and 16, i.e. 2 and 4 prompts; batch 1 = 1 prompt x 1 sample). EOS is suppressed so that every
sequence generates exactly --new-tokens tokens (throughput = batch x new tokens / wall time). The batch sizes are
measured alternately in one process.
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
    from oodpl.models import load_policy
    from oodpl.sampling import encode_prompts, sample_responses

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

    times = C.alternate({f"batch_{bs}": make(bs) for bs in setups}, args.reps)
    gen_cfg.eos_token_id = saved_eos
    res = {"benchmark": "sampling", "new_tokens": N, "times_s": {k: C.stats(v) for k, v in times.items()},
           "tokens_per_second": {k: int(k.split("_")[1]) * N / C.median(v) for k, v in times.items()},
           "prompt_tokens": [len(x) for x in p_ids], "peak_rss_mb": C.peak_rss_mb()}
    print("new tokens/s: " + ", ".join(f"{k} {v:.1f}" for k, v in res["tokens_per_second"].items()))
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
