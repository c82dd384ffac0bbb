"""Profile one meta-training step (K = 1, bank) and one meta-test step (on-policy RLOO) on the default models.

    python scripts/calibration/profile_steps.py [--out perf/out/profile.txt] [--rows 25]

torch.profiler (CPU, operator level, with shapes) and cProfile (Python level) of each step after a warm-up step. The
tables are written to --out; results are not part of results.md (they are for reading, not for comparing).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))  # the benchmarks' shared helpers
import _common as C  # noqa: E402


def main():
    p = C.parser(__doc__.splitlines()[0], reps=1)
    p.add_argument("--out", default=str(C.ROOT / "perf" / "out" / "profile.txt"))
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from oodpl.core.bilevel import DomainTask, meta_gradient
    from oodpl.data.split import build_split
    from oodpl.adapt.metatest import optimise_policy, reward_model_fn
    from oodpl.train.metatrain import build_query_sets, draw_tasks
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.sampling import build_bank

    cfg = C.default_config()
    cfg.meta_test.steps = 1
    policy = load_policy(cfg.policy)
    rm = load_reward_model(cfg.reward)
    split = build_split(cfg.data)
    names = sorted(split.meta_train)
    pad = policy.tokenizer.pad_token_id
    banks = {n: build_bank(policy, [x.prompt for x in split.meta_train[n].support_prompts], cfg.rloo.num_samples, i)
             for i, n in enumerate(names)}
    queries = build_query_sets(policy, split)
    params = [q for q in rm.model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.meta.outer_lr)
    steps = iter(range(1, 1000))

    def meta_step():
        drawn = draw_tasks(next(steps), cfg, names, banks, queries)
        tasks = [DomainTask(n, [banks[n].select(b, pad, rm) for b in inner], queries[n].select(q, pad, rm))
                 for n, inner, q in drawn]
        opt.zero_grad()
        meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn))
        opt.step()

    prompts = [x.prompt for x in split.meta_train[names[0]].support_prompts][: cfg.rloo.batch_prompts]
    rfn = reward_model_fn(rm)

    def test_step():
        optimise_policy(policy, prompts, rfn, cfg, beta=cfg.rloo.beta, seed=0)

    text = io.StringIO()
    for label, fn in (("META-TRAINING STEP (K=1, one-step, bank)", meta_step), ("META-TEST STEP (on-policy RLOO)", test_step)):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        text.write(f"\n===== {label}: torch.profiler, by self CPU time =====\n")
        text.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        text.write(f"\n===== {label}: torch.profiler, by input shape (top) =====\n")
        text.write(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
        text.write(f"\n===== {label}: cProfile, cumulative =====\n{s.getvalue()}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text.getvalue())
    print(f"profile written to {args.out}")


if __name__ == "__main__":
    main()
