"""Meta-training run: the outer loop around bilevel.meta_gradient, with the sample bank, logging, checkpoints, resume
and data-parallel domains (accelerate).

    for step in outer_steps:
        domains   <- meta-batch drawn from (seed, step)             # per-step randomness: exact resume
        tasks     <- K bank minibatches + a query minibatch per domain (this process's share of the domains)
        grad phi  <- meta_gradient(...)                              # bilevel.py
        all-reduce grad phi across processes; clip; Adam step; log; checkpoint
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .bilevel import DomainTask, PreferenceSet, meta_gradient
from .config import Config, dump_config, resolved_hypergrad
from .data.split import DomainSplit, build_split
from .distributed import make_accelerator, prepare_deepspeed, uses_deepspeed
from .errors import UserError, atomic_write_json, atomic_write_text, prepare_run_dir
from .models import Policy, RewardModel, load_policy, load_reward_model
from .runlog import MetricsLogger, phase, rng_state, seed_everything, set_rng_state
from .sampling import SampleBank, build_bank


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------------------
# Sample banks and query sets


def load_or_build_banks(policy: Policy, split: DomainSplit, cfg: Config, directory: Path, accelerator,
                        progress: bool) -> dict[str, SampleBank]:
    """pi_ref samples for every meta-train domain's support prompts, generated once and stored with the run.

    Each process generates the domains i with i % world == rank; everybody then reads all of them."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(split.meta_train)
    rank, world = accelerator.process_index, accelerator.num_processes
    for i, name in enumerate(names):
        path = directory / f"{name}.pt"
        if i % world != rank or path.exists():
            continue
        prompts = [p.prompt for p in split.meta_train[name].support_prompts][: cfg.meta.bank_size or None]
        bank = build_bank(policy, prompts, cfg.rloo.num_samples, seed=cfg.seed * 1000 + i, progress=progress,
                          desc=f"bank {name}")
        bank.save(path)
    accelerator.wait_for_everyone()
    # the frozen trunk (policy.trainable_layers) is kept in memory only: computed once per run for every bank
    return {name: SampleBank.load(directory / f"{name}.pt").attach_trunk(policy) for name in names}


def build_query_sets(policy: Policy, split: DomainSplit, names: list[str] | None = None) -> dict[str, PreferenceSet]:
    """Each meta-train domain's (or each of `names`') human query pairs, tokenised, with log pi_ref computed once."""
    out = {}
    for name in sorted(split.meta_train) if names is None else names:
        pairs = split.meta_train[name].query_pairs
        out[name] = PreferenceSet.build(policy, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                        [p.rejected for p in pairs])
    return out


def draw_tasks(step: int, cfg: Config, names: list[str], banks: dict[str, SampleBank],
               queries: dict[str, PreferenceSet]) -> list[tuple[str, list[list[int]], list[int]]]:
    """The meta-batch of `step`: (domain, K prompt-index batches, query-pair indices), a function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    size = min(cfg.meta.meta_batch_domains, len(names))
    chosen = sorted(rng.choice(len(names), size=size, replace=False).tolist())
    out = []
    for j in chosen:
        name = names[j]
        P = len(banks[name].prompts)
        B = min(cfg.rloo.batch_prompts, P)
        inner = [sorted(rng.choice(P, size=B, replace=False).tolist()) for _ in range(cfg.meta.inner_steps)]
        M = len(queries[name])
        query = sorted(rng.choice(M, size=min(cfg.meta.query_batch, M), replace=False).tolist())
        out.append((name, inner, query))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run_dir: Path, step: int, rm: RewardModel, policy: Policy, optimizer, accelerator) -> Path:
    """checkpoints/step-N/ built under a temporary name and renamed when complete; `latest` is replaced atomically
    after. Collective: under DeepSpeed every process adds its shard of the optimiser state; the main process writes
    the rest (reward model, policy trainable weights, optimiser or shard layout, RNG states, step)."""
    ckpt_root = run_dir / "checkpoints"
    target = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".{target.name}.tmp"
    main, sharded = accelerator.is_main_process, uses_deepspeed(accelerator)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded:  # the ZeRO optimiser's state_dict() is this process's partition
        torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{accelerator.process_index:05d}.pt")
    accelerator.wait_for_everyone()
    if main:
        model = accelerator.unwrap_model(rm.model)
        model.save_pretrained(tmp / "reward_model")
        rm.tokenizer.save_pretrained(tmp / "reward_model")
        torch.save({k: v.detach().cpu() for k, v in policy.trainable_parameters().items()}, tmp / "policy_trainable.pt")
        torch.save({"optimizer": None if sharded else optimizer.state_dict(), "step": step, "rng": rng_state(),
                    "optimizer_shards": accelerator.num_processes if sharded else 0}, tmp / "state.pt")
        old = target.with_name(f".{target.name}.old") if target.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(ckpt_root / "latest", target.name + "\n")
        for old in sorted(ckpt_root.glob("step-*"))[:-2]:  # keep the two newest
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(run_dir: Path, rm: RewardModel, optimizer, accelerator) -> int:
    from safetensors.torch import load_file

    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    weights = ckpt / "reward_model" / "model.safetensors"
    accelerator.unwrap_model(rm.model).load_state_dict(load_file(str(weights)), strict=False)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    shards = int(state.get("optimizer_shards", 0))
    if shards != (accelerator.num_processes if uses_deepspeed(accelerator) else 0):
        raise UserError(f"{ckpt} was written with {shards or 'no'} DeepSpeed optimiser shards; resume it with the "
                        "same launch (number of processes, DeepSpeed or not) it was started with")
    if shards:  # ZeRO takes the list of every rank's partition and picks its own; it refreshes fp32 from the weights
        files = [ckpt / f"optimizer-rank{r:05d}.pt" for r in range(shards)]
        optimizer.load_state_dict([torch.load(f, weights_only=False) if r == accelerator.process_index else None
                                   for r, f in enumerate(files)])
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------------------
# The run


def meta_train(cfg: Config, output: str | Path, resume: bool = False, accelerator=None,
               stop_after: int | None = None) -> dict:
    """Meta-train r_phi over the split's meta-train domains; returns a summary. `stop_after` ends the process's work
    after that many outer steps of this call (tests use it to simulate interruptions)."""
    accelerator = accelerator or make_accelerator()
    main = accelerator.is_main_process
    progress = not cfg.quiet and main
    run_dir = Path(output)
    if main:
        prepare_run_dir(run_dir, "meta-train", cfg.fingerprint())
    accelerator.wait_for_everyone()
    final_dir = run_dir / "reward_model"
    if (run_dir / "summary.json").exists() and final_dir.exists():
        return json.loads((run_dir / "summary.json").read_text())
    has_ckpt = (run_dir / "checkpoints" / "latest").exists()
    if has_ckpt and not resume:
        raise UserError(f"{run_dir} holds an unfinished meta-training run; pass --resume to continue it or choose "
                        "another --output")
    seed_everything(cfg.seed)
    split_path = run_dir / "split.json"
    if split_path.exists():
        split = DomainSplit.load(split_path)
    else:
        split = build_split(cfg.data)
        if main:
            split.save(split_path)
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    if len(split.meta_train) == 0:
        raise UserError("the split has no meta-train domains; check data.meta_train_domains / held_out_domains")

    timings: dict[str, float] = {}
    with phase(timings, "load_models"):
        policy = load_policy(cfg.policy, seed=cfg.seed)
        rm = load_reward_model(cfg.reward, seed=cfg.seed)
        policy.model.to(accelerator.device)
        rm.model.to(accelerator.device)
    with phase(timings, "sample_bank"):
        banks = load_or_build_banks(policy, split, cfg, run_dir / "bank", accelerator, progress)
    with phase(timings, "query_sets"):
        queries = build_query_sets(policy, split)
    names = sorted(split.meta_train)

    params = [p for p in rm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.meta.outer_lr)
    rank, world = accelerator.process_index, accelerator.num_processes
    sharded = uses_deepspeed(accelerator)
    if sharded:
        if min(cfg.meta.meta_batch_domains, len(names)) % world:
            raise UserError(f"under DeepSpeed every process needs the same number of domains per meta-batch: "
                            f"meta.meta_batch_domains={min(cfg.meta.meta_batch_domains, len(names))} is not a "
                            f"multiple of {world} processes; change one of them")
        rm.model, optimizer = prepare_deepspeed(accelerator, rm.model, optimizer, cfg.meta.grad_clip)
    start = load_checkpoint(run_dir, rm, optimizer, accelerator) if resume else 0
    logger = MetricsLogger(run_dir, cfg.report_to, enabled=main, resume_step=start if resume else None,
                           config=cfg.to_dict())
    pad = policy.tokenizer.pad_token_id
    mode = resolved_hypergrad(cfg.meta)
    bar = tqdm(total=cfg.meta.outer_steps, initial=start, desc=f"meta-train ({mode}, K={cfg.meta.inner_steps})",
               disable=not progress, unit="step")
    done_here = 0
    step = start
    for step in range(start + 1, cfg.meta.outer_steps + 1):
        t0 = time.perf_counter()
        step_times: dict[str, float] = {}
        drawn = draw_tasks(step, cfg, names, banks, queries)
        mine = drawn[rank::world]
        with phase(step_times, "bank_reads"):
            tasks = [DomainTask(name, [banks[name].select(b, pad, rm) for b in inner],
                                queries[name].select(q, pad, rm)) for name, inner, q in mine]
        if sharded:  # DeepSpeed's backward reduce-scatters the gradients (a mean over processes), clips and steps
            stats = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn) / world,
                                  timings=step_times, backward=accelerator.backward)
            grad_norm = float(accelerator.deepspeed_engine_wrapped.get_global_grad_norm() or 0.0)
        else:
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            stats = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn), timings=step_times) \
                if tasks else {}
            with phase(step_times, "all_reduce"):
                if world > 1:  # sum of the processes' shares = the single-process mean over the meta-batch
                    flat = torch.cat([p.grad.flatten() for p in params])
                    torch.distributed.all_reduce(flat)
                    offset = 0
                    for p in params:
                        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.meta.grad_clip or float("inf")))
        stats = {k: v * len(tasks) for k, v in stats.items()}  # sums, averaged over processes below
        if world > 1:
            keys = sorted(stats) or ["outer_loss", "bt_loss", "query_accuracy", "inner_reward", "inner_kl"]
            vec = torch.tensor([stats.get(k, 0.0) for k in keys], dtype=torch.float64, device=accelerator.device)
            torch.distributed.all_reduce(vec)
            stats = dict(zip(keys, vec.tolist()))
        stats = {k: v / len(drawn) for k, v in stats.items()}
        if not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in stats.values()):
            last = (run_dir / "checkpoints" / "latest")
            where = last.read_text().strip() if last.exists() else "none yet"
            raise TrainingDiverged(f"non-finite loss or hypergradient at outer step {step} (grad norm {grad_norm}); "
                                   f"stopped, last good checkpoint: {where}; lower meta.outer_lr or meta.inner_lr")
        if not sharded:
            optimizer.step()
        step_times["total"] = time.perf_counter() - t0
        for k, v in step_times.items():
            timings[f"step_{k}"] = timings.get(f"step_{k}", 0.0) + v
        if step % cfg.meta.log_every == 0 or step == cfg.meta.outer_steps:
            logger.log(step, {**stats, "hypergrad_norm": grad_norm,
                              **{f"time/{k}": v for k, v in step_times.items()}})
        bar.update(1)
        bar.set_postfix(outer=f"{stats.get('outer_loss', float('nan')):.4f}",
                        acc=f"{stats.get('query_accuracy', float('nan')):.2f}")
        if step % cfg.meta.checkpoint_every == 0 and step < cfg.meta.outer_steps:
            save_checkpoint(run_dir, step, rm, policy, optimizer, accelerator)
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            bar.close()
            logger.close()
            return {"stopped_at": step}
    bar.close()
    logger.close()
    summary = {"outer_steps": cfg.meta.outer_steps, "hypergrad": mode, "domains": names,
               "timings": timings, "reward_model": str(final_dir)}
    save_checkpoint(run_dir, step, rm, policy, optimizer, accelerator)
    rm.model = accelerator.unwrap_model(rm.model)
    if main:
        rm.save(final_dir)
        atomic_write_json(run_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
