"""Reward-model training throughput: oodpl's `train_reward_model` (the `oodpl train-rm` loop) vs TRL's RewardTrainer.

    python perf/bench_train_rm.py [--reps 3] [--steps 8]

Same pairs (default sentiment split, 4 meta-train domains, pooled query pairs), same backbone (all-MiniLM-L6-v2 with a
scalar head, float32), same batch (train_rm.batch_size = 16 pairs), same max length (reward.max_length = 128 tokens),
same optimiser family (AdamW, lr 5e-5), same number of optimizer steps, one process, CPU.

TRL gets the pairs already tokenised exactly as oodpl tokenises them (`tokenizer(prompt, response)`, truncated to
128), so its one-off dataset preparation (timed separately, as `trl_setup`) is not in its training time, while
oodpl's per-step tokenisation is in ours. TRL runs with logging, saving and evaluation off, report_to none, no
progress bar, dropout disabled (its default). Timed: `train_reward_model(...)` vs `trainer.train()` (each call builds
its own optimizer; the trainer object is built outside the timed region). Ratio = oodpl pairs/s / TRL pairs/s.
"""

from __future__ import annotations

import tempfile

import _common as C


def main():
    p = C.parser(__doc__.splitlines()[0], reps=3)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per timed run (default 8)")
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import time

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from oodpl.data.split import build_split
    from oodpl.models.reward import load_reward_model
    from oodpl.train.rm_train import train_reward_model

    cfg = C.default_config()
    bs, max_len, steps = cfg.train_rm.batch_size, cfg.reward.max_length, args.steps
    pool = build_split(cfg.data).pooled_pairs()
    pairs = (pool * (1 + bs * steps // max(1, len(pool))))[: bs * steps]  # exactly `steps` batches, one epoch
    cfg.train_rm.epochs = 1

    ours_rm = load_reward_model(cfg.reward, seed=0)
    trl_rm = load_reward_model(cfg.reward, seed=0)
    tok = trl_rm.tokenizer

    def ids(prompt, response):
        return tok(prompt, response, truncation=True, max_length=max_len)["input_ids"]

    data = Dataset.from_list([{"chosen_ids": ids(x.prompt, x.chosen), "rejected_ids": ids(x.prompt, x.rejected)}
                              for x in pairs])
    lengths = [len(r) for r in data["chosen_ids"]] + [len(r) for r in data["rejected_ids"]]
    print(f"{len(pairs)} pairs, {steps} steps of {bs}, token lengths mean {sum(lengths) / len(lengths):.1f} "
          f"max {max(lengths)}")
    tmp = tempfile.mkdtemp(prefix="bench_trl_rm_")
    setup_times = []

    def make_trainer():
        t0 = time.perf_counter()
        targs = RewardConfig(
            output_dir=tmp, per_device_train_batch_size=bs, max_steps=steps, num_train_epochs=1,
            learning_rate=cfg.train_rm.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, max_length=max_len, bf16=False, fp16=False,
            gradient_checkpointing=False, seed=0, dataloader_pin_memory=False,
        )
        tr = RewardTrainer(model=trl_rm.model, args=targs, train_dataset=data, processing_class=tok)
        setup_times.append(time.perf_counter() - t0)
        return tr

    holder = {"trainer": make_trainer()}

    def run_ours():
        out = train_reward_model(ours_rm, pairs, cfg.train_rm, seed=0, progress=False)
        assert out["steps"] == steps, out
        return out

    # trainer.train() alone is timed; the next run's trainer is built after the clock stops
    def timed_trl():
        tr = holder["trainer"]
        t0 = time.perf_counter()
        out = tr.train()
        dt = time.perf_counter() - t0
        assert out.global_step == steps, out
        holder["trainer"] = make_trainer()
        return dt

    import gc
    times = {"oodpl": [], "trl": []}
    # warm-up, untimed
    run_ours()
    timed_trl()
    for r in range(args.reps):
        for side in (["oodpl", "trl"] if r % 2 == 0 else ["trl", "oodpl"]):
            gc.collect()
            if side == "oodpl":
                t0 = time.perf_counter()
                run_ours()
                times["oodpl"].append(time.perf_counter() - t0)
            else:
                times["trl"].append(timed_trl())
        print(f"  round {r + 1}/{args.reps}: oodpl {times['oodpl'][-1]:.2f}s, trl {times['trl'][-1]:.2f}s", flush=True)

    n_pairs = bs * steps
    pps = {k: n_pairs / C.median(v) for k, v in times.items()}
    ratio = pps["oodpl"] / pps["trl"]
    print(f"pairs/s: oodpl {pps['oodpl']:.2f}, trl {pps['trl']:.2f}; ratio {ratio:.2f} (target >= 1.0)")
    C.write_json(args.json, {
        "benchmark": "train_rm", "pairs_per_run": n_pairs, "steps": steps, "batch_size": bs, "max_length": max_len,
        "token_length_mean": sum(lengths) / len(lengths), "times_s": {k: C.stats(v) for k, v in times.items()},
        "pairs_per_second": pps, "ratio_oodpl_over_trl": ratio, "target": ">= 1.0",
        "trl_setup_s": C.stats(setup_times), "peak_rss_mb": C.peak_rss_mb()})


if __name__ == "__main__":
    main()
