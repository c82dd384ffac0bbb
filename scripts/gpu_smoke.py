"""GPU smoke test: oodpl on a CUDA machine with no network, run from src/ without installing (scripts/gpu_smoke.sh).

    PYTHONPATH=src python scripts/gpu_smoke.py [--checks-only] [--skip-default-arch]

1. checks: device placement (CUDA itself refuses mixed devices), trunk cached == uncached, bf16 log-probs vs fp32 and
   self-KL 0, on CUDA.
2. for tiny random models and for randomly initialised models of the default architectures (SmolLM2-135M policy,
   MiniLM-L6 reward model; configs only, no weights): a 2-step meta-train in bf16 (synthetic preference file, no
   built-in data download), a 2-step meta-test, and timed meta steps at the default sizes (full depth and frozen trunk
   L = 4), printing step times and peak GPU memory.
Exits non-zero on any failure. Needs only torch, transformers, peft, accelerate, tokenizers, safetensors, pyyaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDS = ("good fine great calm kind warm bright clear quick neat bad dull slow cold rude dark vague late messy sad "
         "the a of to and in for with on at by it is was very not").split()


def write_pairs(path: Path, domains: int = 4, pairs: int = 40, seed: int = 0) -> Path:
    """A synthetic preference file (JSONL, our standard columns): the built-in data need a download."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for d in range(domains):
            for i in range(pairs):
                prompt = f"domain {d} item {i}: " + " ".join(rng.choice(WORDS) for _ in range(6))
                chosen = " ".join(rng.choice(WORDS[:10]) for _ in range(5))
                rejected = " ".join(rng.choice(WORDS[10:20]) for _ in range(5))
                f.write(json.dumps({"domain": f"d{d}", "prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def config(pairs: Path, policy: str, reward: str, dtype: str, overrides: list[str] = ()):
    from oodpl.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml", [
        "data.task=file", f"data.path={pairs}", "data.held_out_domains=[d3]", "data.meta_train_domains=[d0,d1,d2]",
        f"policy.name_or_path={policy}", f"reward.name_or_path={reward}", f"policy.dtype={dtype}",
        f"reward.dtype={dtype}", "meta.outer_steps=2", "meta.init=scratch", "quiet=true", "report_to=[none]",
        *overrides])


DEV = "cuda"  # --cpu (a dry run of the whole script on the CPU, for tests) sets "cpu"


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------------
# checks (also collected by pytest -m gpu: tests/test_gpu.py)


def _tiny(dtype="float32", layers=None, name="tiny-random"):
    from oodpl.config import PolicyConfig, RewardConfig
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.precision import place

    dev = DEV
    policy = place(load_policy(PolicyConfig(name_or_path=name, dtype=dtype, max_new_tokens=6, max_prompt_tokens=16,
                                            lora_r=2, lora_alpha=4, trainable_layers=layers)), device=dev)
    rm = place(load_reward_model(RewardConfig(name_or_path="tiny-random", dtype=dtype, max_length=64)), device=dev)
    return policy, rm


PROMPTS = ["the film was", "my order came", "service here is", "i think that"]


def check_meta_step_on_cuda():
    """A full meta step (bank, query pairs, inner step, JVP, RM backward) on CUDA: CUDA raises on mixed devices."""
    from oodpl.core.bilevel import DomainTask, PreferenceSet, meta_gradient
    from oodpl.config import MetaConfig, RLOOConfig
    from oodpl.adapt.metatest import optimise_policy, reward_model_fn
    from oodpl.models.sampling import build_bank

    for layers in (None, 1):
        policy, rm = _tiny(layers=layers)
        bank = build_bank(policy, PROMPTS, n=2, seed=0)
        assert bank.ref_logp.device.type == DEV
        pset = PreferenceSet.build(policy, PROMPTS[:3], ["good", "fine", "great"], ["bad", "dull", "rude"])
        pad = policy.tokenizer.pad_token_id
        tasks = [DomainTask("d", [bank.select([0, 1], pad, rm)], pset.select([0, 1, 2], pad, rm))]
        for mode in ("one-step", "unrolled"):
            meta_gradient(policy, rm, tasks, MetaConfig(inner_steps=1, hypergrad=mode), RLOOConfig(num_samples=2))
        from oodpl.config import Config

        cfg = Config()
        cfg.rloo.num_samples, cfg.rloo.batch_prompts, cfg.meta_test.steps, cfg.rloo.reward_norm = 2, 2, 1, "none"
        optimise_policy(policy, PROMPTS, reward_model_fn(rm), cfg, beta=0.1, seed=0)


def check_trunk_equals_uncached_on_cuda():
    import dataclasses

    from oodpl.models.sampling import build_bank

    policy, _ = _tiny(layers=1, name="tiny-random-llama")
    batch = build_bank(policy, PROMPTS, n=2, seed=0).select([2, 0], policy.tokenizer.pad_token_id).batch
    a = policy.logprobs(batch)
    b = policy.logprobs(dataclasses.replace(batch, trunk=None, trunk_layer=None))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a, b)


def check_bf16_precision_on_cuda():
    from oodpl.core.objectives import kl_k1
    from oodpl.models.sampling import build_bank, policy_logprobs

    p32, _ = _tiny("float32")
    p16, _ = _tiny("bf16")
    batch = build_bank(p32, PROMPTS, n=2, seed=0).select([0, 1, 2, 3], p32.tokenizer.pad_token_id).batch
    with torch.no_grad():
        a, b = policy_logprobs(p32.model, batch), policy_logprobs(p16.model, batch)
        with p16.reference() as ref:
            r = policy_logprobs(ref, batch)
    assert b.dtype == torch.float32 and ((a - b).abs() / a.abs()).max() < 1e-2
    assert torch.equal(kl_k1(b, r), torch.zeros_like(b))


CHECKS = [check_meta_step_on_cuda, check_trunk_equals_uncached_on_cuda, check_bf16_precision_on_cuda]


# ----------------------------------------------------------------------------------------------------------------------
# runs


def run_models(pairs: Path, policy: str, reward: str, dtype: str, work: Path, timed_steps: int) -> dict:
    from oodpl.adapt.metatest import optimise_policy, reward_model_fn
    from oodpl.train.metatrain import meta_train
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.precision import place

    out = {"policy": policy, "reward": reward, "dtype": dtype}
    cfg = config(pairs, policy, reward, dtype)
    reset_peak()
    t0 = time.perf_counter()
    summary = meta_train(cfg, work / f"mt-{policy}-{dtype}")
    sync()
    out["meta_train_2_steps_s"] = time.perf_counter() - t0
    out["meta_train_timings"] = {k: round(v, 3) for k, v in summary.get("timings", {}).items()}
    out["meta_train_peak_gb"] = peak_gb()

    reset_peak()
    pol = place(load_policy(cfg.policy), device=DEV)
    rm = place(load_reward_model(cfg.reward), device=DEV)
    t0 = time.perf_counter()
    res = optimise_policy(pol, [f"domain 3 item {i}:" for i in range(8)], reward_model_fn(rm), cfg, beta=0.1, seed=0,
                          reward_scale=1.0)
    sync()
    out["meta_test_2_steps_s"] = time.perf_counter() - t0
    out["meta_test_peak_gb"] = peak_gb()
    out["meta_test_last"] = res["history"][-1]
    if timed_steps:
        out["meta_step_default_sizes"] = time_meta_steps(pairs, policy, reward, dtype, timed_steps)
    return out


def time_meta_steps(pairs: Path, policy: str, reward: str, dtype: str, steps: int) -> dict:
    """Seconds per meta step (K = 1) at the default sizes (meta-batch 2 x 8 prompts x 4 samples, 16 query pairs, 16
    new tokens), full depth vs frozen trunk L = 4, and peak memory."""
    from oodpl.core.bilevel import DomainTask, meta_gradient
    from oodpl.config import Config
    from oodpl.data.split import build_split
    from oodpl.train.metatrain import build_query_sets, draw_tasks
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.precision import place
    from oodpl.models.sampling import build_bank

    base = Config()
    out = {}
    for layers in (None, 4):
        cfg = config(pairs, policy, reward, dtype, [
            f"rloo.num_samples={base.rloo.num_samples}", f"rloo.batch_prompts={base.rloo.batch_prompts}",
            f"meta.query_batch={base.meta.query_batch}", f"policy.max_new_tokens={base.policy.max_new_tokens}",
            f"policy.max_prompt_tokens={base.policy.max_prompt_tokens}", "data.support_size=8", "data.query_size=16",
            f"policy.lora_r={base.policy.lora_r}", f"policy.lora_alpha={base.policy.lora_alpha}",
            f"reward.max_length={base.reward.max_length}"] + ([f"policy.trainable_layers={layers}"] if layers else []))
        reset_peak()
        pol = place(load_policy(cfg.policy), device=DEV)
        rm = place(load_reward_model(cfg.reward), device=DEV)
        split = build_split(cfg.data)
        names = sorted(split.meta_train)
        t0 = time.perf_counter()
        banks = {n: build_bank(pol, [p.prompt for p in split.meta_train[n].support_prompts], cfg.rloo.num_samples, i)
                 for i, n in enumerate(names)}
        queries = build_query_sets(pol, split)
        sync()
        setup = time.perf_counter() - t0
        pad = pol.tokenizer.pad_token_id
        times = []
        for step in range(1, steps + 2):  # the first is a warm-up
            t0 = time.perf_counter()
            tasks = [DomainTask(n, [banks[n].select(b, pad, rm) for b in inner], queries[n].select(q, pad, rm))
                     for n, inner, q in draw_tasks(step, cfg, names, banks, queries)]
            rm.model.zero_grad()
            meta_gradient(pol, rm, tasks, cfg.meta, cfg.rloo)
            sync()
            times.append(time.perf_counter() - t0)
        key = "full_depth" if layers is None else f"trunk_L{layers}"
        out[key] = {"step_s": sorted(times[1:])[len(times[1:]) // 2], "all_s": [round(t, 3) for t in times],
                    "bank_and_query_sets_s": round(setup, 2), "peak_gb": peak_gb()}
        del pol, rm, banks, queries
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["ratio_full_over_trunk"] = out["full_depth"]["step_s"] / out["trunk_L4"]["step_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--skip-default-arch", action="store_true", help="tiny models only (faster)")
    ap.add_argument("--timed-steps", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (tests of the script itself)")
    args = ap.parse_args()
    global DEV
    if args.cpu:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0) if DEV == 'cuda' else 'CPU dry run'}", flush=True)
    failures = 0
    for check in CHECKS:
        t0 = time.perf_counter()
        try:
            check()
            print(f"PASS {check.__name__} ({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception:
            failures += 1
            print(f"FAIL {check.__name__}\n{traceback.format_exc()}", flush=True)
    if args.checks_only:
        return 1 if failures else 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = write_pairs(work / "pairs.jsonl")
        runs = [("tiny-random", "tiny-random", "bf16", 0), ("tiny-random-llama", "tiny-random", "bf16", 0)]
        if not args.skip_default_arch:
            runs += [("random-smollm2-135m", "random-minilm-l6", "bf16", args.timed_steps),
                     ("random-smollm2-135m", "random-minilm-l6", "float32", args.timed_steps)]
        for policy, reward, dtype, timed in runs:
            try:
                res = run_models(pairs, policy, reward, dtype, work, timed)
                print("RUN " + json.dumps(res, default=str), flush=True)
            except Exception:
                failures += 1
                print(f"FAIL run {policy}/{reward} {dtype}\n{traceback.format_exc()}", flush=True)
    print(f"gpu_smoke: {'FAILED (' + str(failures) + ')' if failures else 'all passed'}; peak GPU memory "
          f"{peak_gb():.2f} GB (last run)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
