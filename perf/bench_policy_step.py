"""One meta-test policy-optimisation step: oodpl's `optimise_policy` (meta_test.steps = 1) vs one RLOOTrainer step.

    python perf/bench_policy_step.py [--reps 3]

Same policy (SmolLM2-135M-Instruct, float32, LoRA r 8 / alpha 16 on q_proj, v_proj), same reward model (the default
all-MiniLM-L6-v2 scalar head), same 8 prompts (sentiment, <= 32 tokens), n = 4 samples per prompt, at most 16 new
tokens, temperature 1 / top-k off / top-p 1, beta 0.1, Adam-type optimizer, one optimizer step, one process, CPU.

TRL is configured like-for-like and for speed: float32 (bf16 off; TRL defaults it on), gradient checkpointing off (TRL
defaults it on), num_iterations 1, per_device_train_batch_size 32 completions = 8 prompts x 4, logging / saving /
evaluation off, report_to none. Its RM scores `prompt + completion` (TRL's own path); ours scores the text pair.

Timed per round: oodpl = the whole `optimise_policy(...)` call (includes its optimizer set-up); TRL = the step as seen
by a TrainerCallback (on_step_begin -> on_step_end: generation, old/ref log-probs, rewards, loss, backward, optimizer
step) and, separately, the whole `trainer.train()` call (adds Trainer start-up: dataloader, optimizer, callbacks). The
trainer itself (model load + LoRA wrapping) is built outside the timed region. Ratio = TRL time / oodpl time.
"""

from __future__ import annotations

import tempfile
import time

import _common as C


def main():
    p = C.parser(__doc__.splitlines()[0], reps=3)
    args = p.parse_args()
    C.setup_threads(args.threads)
    C.quiet_logs()
    import gc

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from oodpl.data.split import build_split
    from oodpl.adapt.metatest import optimise_policy, reward_model_fn
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model

    cfg = C.default_config()
    cfg.meta_test.steps = 1
    B, n, beta = cfg.rloo.batch_prompts, cfg.rloo.num_samples, cfg.rloo.beta
    policy = load_policy(cfg.policy)
    rm = load_reward_model(cfg.reward)
    tok = policy.tokenizer
    split = build_split(cfg.data)
    pool = [x.prompt for d in sorted(split.meta_train) for x in split.meta_train[d].support_prompts]
    prompts = [x for x in pool if len(tok(x, add_special_tokens=False)["input_ids"]) <= cfg.policy.max_prompt_tokens][:B]
    assert len(prompts) == B
    reward_fn = reward_model_fn(rm)

    ckpt = C.policy_checkpoint_dir()
    trl_tok = AutoTokenizer.from_pretrained(ckpt)
    trl_tok.padding_side = "left"
    if trl_tok.pad_token is None:
        trl_tok.pad_token = trl_tok.eos_token
    rm_dir = C.reward_checkpoint_dir()
    trl_rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    trl_rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    data = Dataset.from_list([{"prompt": x} for x in prompts])
    tmp = tempfile.mkdtemp(prefix="bench_trl_rloo_")
    lora = LoraConfig(r=cfg.policy.lora_r, lora_alpha=cfg.policy.lora_alpha, target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()

    def make_trainer(seed):
        targs = RLOOConfig(
            output_dir=tmp, per_device_train_batch_size=B * n, gradient_accumulation_steps=1, num_generations=n,
            max_completion_length=cfg.policy.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=beta,
            num_iterations=1, learning_rate=cfg.meta_test.lr, lr_scheduler_type="constant", warmup_steps=0,
            max_steps=1, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=seed, log_completions=False,
        )
        return RLOOTrainer(model=ckpt, reward_funcs=trl_rm, args=targs, train_dataset=data, processing_class=trl_tok,
                           reward_processing_classes=trl_rm_tok, peft_config=lora, callbacks=[timer])

    trl_total = []
    holder = {"tr": make_trainer(0)}

    def trl_step():
        tr = holder["tr"]
        t0 = time.perf_counter()
        out = tr.train()
        trl_total.append(time.perf_counter() - t0)
        assert out.global_step == 1
        holder["tr"] = None
        del tr
        gc.collect()
        holder["tr"] = make_trainer(len(trl_total))  # untimed: built after the clock stopped
        return timer.times[-1]

    seeds = iter(range(1000))

    def ours_step():
        t0 = time.perf_counter()
        optimise_policy(policy, prompts, reward_fn, cfg, beta=beta, seed=next(seeds))
        return time.perf_counter() - t0

    times = {"oodpl": [], "trl_step": []}
    ours_step(), trl_step()  # warm-up
    trl_total.clear()
    for r in range(args.reps):
        for side in (["oodpl", "trl_step"] if r % 2 == 0 else ["trl_step", "oodpl"]):
            gc.collect()
            times[side].append(ours_step() if side == "oodpl" else trl_step())
        print(f"  round {r + 1}/{args.reps}: oodpl {times['oodpl'][-1]:.2f}s, trl step {times['trl_step'][-1]:.2f}s "
              f"(trl train() {trl_total[-1]:.2f}s)", flush=True)
    times["trl_train_call"] = trl_total
    ratio = C.median(times["trl_step"]) / C.median(times["oodpl"])
    ratio_call = C.median(times["trl_train_call"]) / C.median(times["oodpl"])
    print(f"median: oodpl {C.median(times['oodpl']):.2f}s, trl step {C.median(times['trl_step']):.2f}s, "
          f"trl train() {C.median(trl_total):.2f}s; ratio (trl step / oodpl) {ratio:.2f} (target >= 1.0), "
          f"ratio (trl train() / oodpl) {ratio_call:.2f}")
    C.write_json(args.json, {
        "benchmark": "policy_step", "prompts": B, "samples_per_prompt": n, "max_new_tokens": cfg.policy.max_new_tokens,
        "beta": beta, "times_s": {k: C.stats(v) for k, v in times.items()},
        "ratio_trl_step_over_oodpl": ratio, "ratio_trl_train_call_over_oodpl": ratio_call, "target": ">= 1.0",
        "peak_rss_mb": C.peak_rss_mb()})


if __name__ == "__main__":
    main()
