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
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .bilevel import DomainTask, PreferenceSet, gradient_term_norms, meta_gradient
from .objectives import pair_accuracy
from .config import Config, dump_config, resolved_hypergrad
from .data.split import DomainSplit, build_split
from .distributed import make_accelerator, prepare_deepspeed, uses_deepspeed
from .checkpoints import last_good_checkpoint, load_checkpoint, save_checkpoint
from .errors import RunClaim, UserError, atomic_write_json, atomic_write_text, claim_run_dir
from .models import Policy, RewardModel, load_policy, load_reward_checkpoint, load_reward_model, place
from .runlog import MetricsLogger, phase, seed_everything
from .sampling import SampleBank, build_bank


# per-domain statistics of meta_gradient, averaged over the meta-batch (across processes too)
MEAN_STATS = ("outer_loss", "outer_loss_before", "bt_loss", "query_accuracy", "inner_reward", "inner_reward_std",
              "inner_kl", "inner_step_length")


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
    # log pi_ref moved to the policy's device; the frozen trunk (policy.trainable_layers) is kept in memory only:
    # computed once per run for every bank
    return {name: SampleBank.load(directory / f"{name}.pt").for_policy(policy) for name in names}


def build_query_sets(policy: Policy, split: DomainSplit, names: list[str] | None = None) -> dict[str, PreferenceSet]:
    """Each meta-train domain's (or each of `names`') human query pairs, tokenised, with log pi_ref computed once."""
    out = {}
    for name in sorted(split.meta_train) if names is None else names:
        pairs = split.meta_train[name].query_pairs
        out[name] = PreferenceSet.build(policy, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                        [p.rejected for p in pairs])
    return out


def draw_tasks(step: int, cfg: Config, names: list[str], banks: dict[str, SampleBank | int],
               queries: dict[str, PreferenceSet | int]) -> list[tuple[str, list[list[int]], list[int]]]:
    """The meta-batch of `step`: (domain, K prompt-index batches, query-pair indices), a function of (seed, step).
    `banks` / `queries` give each domain's bank and query set, or just their sizes (the erm-rm-extra control draws
    the same query minibatches without building either)."""
    rng = np.random.default_rng([cfg.seed, step])
    size = min(cfg.meta.meta_batch_domains, len(names))
    chosen = sorted(rng.choice(len(names), size=size, replace=False).tolist())
    out = []
    for j in chosen:
        name = names[j]
        P = banks[name] if isinstance(banks[name], int) else len(banks[name].prompts)
        B = min(cfg.rloo.batch_prompts, P)
        inner = [sorted(rng.choice(P, size=B, replace=False).tolist()) for _ in range(cfg.meta.inner_steps)]
        M = queries[name] if isinstance(queries[name], int) else len(queries[name])
        query = sorted(rng.choice(M, size=min(cfg.meta.query_batch, M), replace=False).tolist())
        out.append((name, inner, query))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The run


def initial_reward_model(cfg: Config, split: DomainSplit, run_dir: Path, init_reward_model: str | Path | None,
                         accelerator) -> RewardModel:
    """phi_0 (method.md, "Initialisation"): `meta.init: bt` (default) starts from the Bradley-Terry RM on the pooled
    meta-train pairs — `init_reward_model` when given (the benchmark passes the same seed's erm-rm), otherwise trained
    here once into RUN/init_reward_model —; `scratch` from a freshly initialised scalar head."""
    if cfg.meta.init == "scratch":
        return load_reward_model(cfg.reward, seed=cfg.seed)
    path = Path(init_reward_model) if init_reward_model else run_dir / "init_reward_model"
    if init_reward_model is None and not (path / "config.json").exists():
        from .rm_train import train_reward_model

        # every process takes part: train_reward_model is data-parallel, and its collectives would hang a call from
        # the main process alone under DDP / DeepSpeed. Its own Accelerator: accelerate ties one DeepSpeed engine
        # to an Accelerator, and the run's is meta-training's. The main process saves the result.
        from .progress import step

        seed_everything(cfg.seed)
        rm = load_reward_model(cfg.reward, seed=cfg.seed)
        with step(f"training the warm-start reward model (meta.init: bt) on {len(split.pooled_pairs())} pooled pairs"):
            train_reward_model(rm, split.pooled_pairs(), cfg.train_rm, seed=cfg.seed, progress=False)
        if accelerator.is_main_process:
            rm.save(path)
        accelerator.wait_for_everyone()
    if not (path / "config.json").exists():
        raise UserError(f"meta-train: the initial reward model {path} is not a checkpoint directory; pass a saved "
                        "reward model or set meta.init=scratch")
    return load_reward_checkpoint(path, cfg.reward)


# settings that --resume may change in a finished or stopped run: budgets, not what each step computes
BUDGET_KEYS = ("meta.outer_steps", "meta.checkpoint_every", "meta.log_every")


def meta_train(cfg: Config, output: str | Path, resume: bool = False, accelerator=None,
               stop_after: int | None = None, init_reward_model: str | Path | None = None) -> dict:
    """Meta-train r_phi over the split's meta-train domains; returns a summary. `stop_after` ends the process's work
    after that many outer steps of this call (tests use it to simulate interruptions); `init_reward_model`: phi_0
    for meta.init=bt (see initial_reward_model).

    The output directory is locked for the whole run (a second process on it exits with one line naming this one's
    pid); a start that fails (bad data, model, checkpoint, ...) removes what it created (errors.claim_run_dir)."""
    accelerator = accelerator or make_accelerator()
    with claim_run_dir(output, "meta-train", cfg.fingerprint(), enabled=accelerator.is_main_process,
                       extendable=BUDGET_KEYS, resume=resume) as claim:
        accelerator.wait_for_everyone()
        return _meta_train(cfg, Path(output), claim, resume, accelerator, stop_after, init_reward_model)


def _meta_train(cfg: Config, run_dir: Path, claim: RunClaim, resume: bool, accelerator, stop_after: int | None,
                init_reward_model: str | Path | None) -> dict:
    main = accelerator.is_main_process
    progress = not cfg.quiet and main
    final_dir = run_dir / "reward_model"
    if (run_dir / "summary.json").exists() and final_dir.exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        if not resume or summary.get("outer_steps") == cfg.meta.outer_steps:
            return summary
        # --resume with a larger meta.outer_steps: the finished run continues from its last checkpoint
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
        rm = initial_reward_model(cfg, split, run_dir, init_reward_model, accelerator)
        place(policy, accelerator)
        place(rm, accelerator)
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
    if start > cfg.meta.outer_steps:
        raise UserError(f"{run_dir} has run {start} outer steps; meta.outer_steps={cfg.meta.outer_steps} cannot "
                        f"shorten it: set meta.outer_steps >= {start} or choose another --output")
    if resume and main:  # the settings this (possibly extended) run goes on with
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    claim.commit()  # start-up done: from here on a failure keeps the run's files for --resume
    logger = MetricsLogger(run_dir, cfg.report_to, enabled=main, resume_step=start if resume else None,
                           config=cfg.to_dict(), tracking=cfg.tracking, stage="meta-train")
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
        parts: dict[str, list[torch.Tensor]] = {}
        if sharded:  # DeepSpeed's backward reduce-scatters the gradients (a mean over processes), clips and steps
            stats = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn) / world,
                                  timings=step_times, backward=accelerator.backward, parts=parts)
            grad_norm = float(accelerator.deepspeed_engine_wrapped.get_global_grad_norm() or 0.0)
            norms = dict.fromkeys(("hypergrad_term_norm", "bt_term_norm", "grad_ratio"))  # not measured apart
        else:
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            stats = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn), timings=step_times,
                                  parts=parts) if tasks else {}
            hyper = parts.get("hyper") or [torch.zeros_like(p) for p in params]
            with phase(step_times, "all_reduce"):
                if world > 1:  # sum of the processes' shares = the single-process mean over the meta-batch
                    flat = torch.cat([p.grad.flatten() for p in params] + [h.flatten() for h in hyper])
                    torch.distributed.all_reduce(flat)
                    n_total = sum(p.numel() for p in params)
                    offset = 0
                    for p, h in zip(params, hyper):
                        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                        h.copy_(flat[n_total + offset:n_total + offset + p.numel()].view_as(p))
                        offset += p.numel()
            # the two terms of dF/dphi over the whole meta-batch: hypergradient and lambda_bt * grad BT = total - it
            norms = gradient_term_norms(hyper, [p.grad - h for p, h in zip(params, hyper)])
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.meta.grad_clip or float("inf")))
        vals = {k: stats.get(k, 0.0) * len(tasks) for k in MEAN_STATS}  # sums, averaged over processes below
        if world > 1:
            vec = torch.tensor([vals[k] for k in MEAN_STATS], dtype=torch.float64, device=accelerator.device)
            torch.distributed.all_reduce(vec)
            vals = dict(zip(MEAN_STATS, vec.tolist()))
        stats = {**{k: v / len(drawn) for k, v in vals.items()}, "grad_norm": grad_norm,
                 "hypergrad_norm": norms["hypergrad_term_norm"], "bt_term_norm": norms["bt_term_norm"],
                 "grad_ratio": norms["grad_ratio"]}
        if not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in stats.values() if v is not None):
            # the last checkpoint with finite metrics AND bounded weights; `latest` names it, so --resume starts there
            where = last_good_checkpoint(run_dir) if main else None
            where = f"{where} (--resume restarts there)" if where else "none (start again in a new --output)"
            raise TrainingDiverged(f"non-finite loss or hypergradient at outer step {step} (grad norm {grad_norm}); "
                                   f"stopped, last good checkpoint: {where}; lower meta.outer_lr or meta.inner_lr")
        if not sharded:
            optimizer.step()
        step_times["total"] = time.perf_counter() - t0
        for k, v in step_times.items():
            timings[f"step_{k}"] = timings.get(f"step_{k}", 0.0) + v
        if step % cfg.meta.log_every == 0 or step == cfg.meta.outer_steps:
            logger.log(step, {**{k: v for k, v in stats.items() if v is not None},
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


# ----------------------------------------------------------------------------------------------------------------------
# The control that isolates the hypergradient (method.md, Baselines: `erm-rm-extra`)


def bank_sizes(cfg: Config, split: DomainSplit) -> dict[str, int]:
    """Prompts per meta-train domain in its sample bank (what draw_tasks draws inner batches from)."""
    return {n: len(d.support_prompts[: cfg.meta.bank_size or None]) for n, d in split.meta_train.items()}


def refine_by_bt(cfg: Config, split: DomainSplit, init_reward_model: str | Path, output: str | Path,
                 progress: bool = False) -> dict:
    """The same warm-start RM trained further by Bradley-Terry alone: meta-training's outer loop with the
    hypergradient removed — the same outer steps, meta-batches and query minibatches (draw_tasks of the same seed),
    Adam at meta.outer_lr, clipping at meta.grad_clip. meta-rm minus this control is what the hypergradient adds.
    Writes OUTPUT/reward_model, OUTPUT/metrics.jsonl and OUTPUT/summary.json (atomically; a rerun after a finished
    run returns its summary, an interrupted one starts over: it takes a minute)."""
    from .objectives import bradley_terry_loss

    run_dir = Path(output)
    if (run_dir / "summary.json").exists() and (run_dir / "reward_model").exists():
        return json.loads((run_dir / "summary.json").read_text())
    seed_everything(cfg.seed)
    rm = load_reward_checkpoint(init_reward_model, cfg.reward)
    names = sorted(split.meta_train)
    pairs = {n: split.meta_train[n].query_pairs for n in names}
    params = [p for p in rm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.meta.outer_lr)
    sizes, counts = bank_sizes(cfg, split), {n: len(pairs[n]) for n in names}
    rows = []
    for step in tqdm(range(1, cfg.meta.outer_steps + 1), desc="erm-rm-extra (BT only)", disable=not progress,
                     unit="step"):
        optimizer.zero_grad()
        drawn = draw_tasks(step, cfg, names, sizes, counts)
        loss_sum, acc_sum = 0.0, 0.0
        for name, _, idx in drawn:
            chosen = [pairs[name][i] for i in idx]
            prompts = [p.prompt for p in chosen]
            r_c = rm.score(prompts, [p.chosen for p in chosen])
            r_r = rm.score(prompts, [p.rejected for p in chosen])
            loss = bradley_terry_loss(r_c, r_r) / len(drawn)
            loss.backward()
            loss_sum += float(loss.detach())
            acc_sum += pair_accuracy(r_c.detach(), r_r.detach()) / len(drawn)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.meta.grad_clip or float("inf")))
        if not math.isfinite(grad_norm) or not math.isfinite(loss_sum):
            raise TrainingDiverged(f"erm-rm-extra: non-finite BT loss or gradient at step {step}; lower "
                                   "meta.outer_lr")
        optimizer.step()
        rows.append({"step": step, "bt_loss": loss_sum, "query_accuracy": acc_sum, "grad_norm": grad_norm})
    rm.save(run_dir / "reward_model")
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"outer_steps": cfg.meta.outer_steps, "objective": "bt-only", "init": str(init_reward_model),
               "domains": names, "reward_model": str(run_dir / "reward_model")}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
