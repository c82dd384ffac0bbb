"""Attention kernel and gradient checkpointing: one first-order policy pass (log-probs forward + backward to the LoRA
parameters, as in an inner RLOO step) with SDPA's default (fused) kernel vs the math kernel that second-order passes
must use, and with / without policy.gradient_checkpointing.

    python perf/bench_attention.py [--reps 3] [--rows 32] [--prompt-tokens 32] [--response-tokens 16]

Default policy (SmolLM2-135M, float32, LoRA r 8 on q/v), random token ids (no generation: the pass is what is timed).
Reported: median seconds per pass, and the bytes autograd saves for the backward (activation memory; on a GPU this is
what bounds the batch), for each side.
"""

from __future__ import annotations

import dataclasses

import _common as C


def main():
    p = C.parser(__doc__.splitlines()[0], reps=3)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--response-tokens", type=int, default=16)
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from oodpl.models.policy import load_policy
    from oodpl.models.sampling import collate

    cfg = C.default_config()
    plain = load_policy(cfg.policy)
    ckpt = load_policy(dataclasses.replace(cfg.policy, gradient_checkpointing=True))
    g = torch.Generator().manual_seed(0)
    V = min(len(plain.tokenizer), 32000)
    rand = lambda n: torch.randint(10, V, (n,), generator=g).tolist()  # noqa: E731
    batch = collate([rand(args.prompt_tokens) for _ in range(args.rows)],
                    [rand(args.response_tokens) for _ in range(args.rows)], plain.tokenizer.pad_token_id)
    saved = {}

    def first_order(policy, kernel=None, name=""):
        def run():
            theta = {k: v.detach().requires_grad_() for k, v in policy.trainable_parameters().items()}
            total = [0]

            def pack(t):
                total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if kernel is None:
                    logp = policy.logprobs(batch, params=theta)
                else:
                    with sdpa_kernel([kernel]):
                        logp = policy.logprobs(batch, params=theta)
            torch.autograd.grad(logp.sum(), list(theta.values()))
            saved[name] = total[0]
        return run

    sides = {"sdpa_default": first_order(plain, None, "sdpa_default"),
             "sdpa_math": first_order(plain, SDPBackend.MATH, "sdpa_math"),
             "checkpointing": first_order(ckpt, None, "checkpointing")}
    times = C.alternate(sides, reps=args.reps)
    m = {k: C.median(v) for k, v in times.items()}
    res = {"benchmark": "attention", "rows": args.rows, "tokens": args.prompt_tokens + args.response_tokens,
           "times_s": {k: C.stats(v) for k, v in times.items()}, "saved_activation_mb": {k: v / 2**20 for k, v in
                                                                                         saved.items()},
           "ratio_math_over_default": m["sdpa_math"] / m["sdpa_default"],
           "ratio_checkpointing_over_default": m["checkpointing"] / m["sdpa_default"],
           "saved_ratio_checkpointing": saved["checkpointing"] / saved["sdpa_default"]}
    for k in sides:
        print(f"{k:>14}: {m[k]:.3f}s per forward+backward, autograd saves {saved[k] / 2**20:.1f} MB")
    print(f"math / fused = {res['ratio_math_over_default']:.2f}x time; checkpointing = "
          f"{res['ratio_checkpointing_over_default']:.2f}x time, {res['saved_ratio_checkpointing']:.2f}x saved memory")
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
