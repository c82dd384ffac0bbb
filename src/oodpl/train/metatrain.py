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

from oodpl.core.bilevel import DemonstrationSet, DomainTask, PreferenceSet, gradient_term_norms, meta_gradient
from oodpl.core.objectives import pair_accuracy
from oodpl.config import Config, MetaConfig, resolved_hypergrad
from oodpl.data.split import DomainSplit, load_or_build_split
from oodpl.runtime.distributed import make_accelerator, prepare_deepspeed, uses_deepspeed
from oodpl.train.checkpoints import (drop_damaged_files, last_good_checkpoint, load_checkpoint, load_inner_thetas, notice,
                          save_checkpoint, write_manifest)
from oodpl.errors import UserError, atomic_write_json, atomic_write_text
from oodpl.models.policy import Policy, load_policy
from oodpl.models.reward import RewardModel, load_reward_checkpoint, load_reward_model
from oodpl.models.precision import place
from oodpl.paths import inside
from oodpl.runtime.rundir import Run, RunLayout, open_run
from oodpl.runtime.runlog import MetricsLogger, phase, seed_everything
from oodpl.models.sampling import SampleBank, build_bank, draw_samples


# per-domain statistics of meta_gradient, averaged over the meta-batch (across processes too)
MEAN_STATS = ("outer_loss", "outer_loss_before", "bt_loss", "query_accuracy", "inner_reward", "inner_reward_std",
              "inner_kl", "inner_kl_start", "inner_step_length", "inner_iw_std", "headroom", "alignment",
              "first_order_drop")


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------------------
# Sample banks and query sets


def load_or_build_banks(policy: Policy, split: DomainSplit, cfg: Config, directory: Path, accelerator,
                        progress: bool) -> dict[str, SampleBank]:
    """pi_ref samples for every meta-train domain's support prompts, generated once and stored with the run.

    Each process generates the domains i with i % world == rank; everybody then reads all of them."""
    directory.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:  # resume reads the banks: ones that do not match bank/manifest.json are rebuilt
        drop_damaged_files(directory, "sample bank")
    accelerator.wait_for_everyone()
    names = sorted(split.meta_train)
    rank, world = accelerator.process_index, accelerator.num_processes
    for i, name in enumerate(names):
        path = inside(directory, f"{name}.pt")
        if i % world != rank or path.exists():
            continue
        prompts = [p.prompt for p in split.meta_train[name].support_prompts][: cfg.meta.bank_size or None]
        bank = build_bank(policy, prompts, cfg.rloo.num_samples, seed=cfg.seed * 1000 + i, progress=progress,
                          desc=f"bank {name}")
        bank.save(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(directory)
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


def build_demonstration_sets(policy: Policy, split: DomainSplit, cfg: Config,
                             banks: dict[str, SampleBank]) -> dict[str, DemonstrationSet]:
    """meta.inner_candidates=samples+demos: each meta-train domain's demonstrations, the human continuations of its
    bank's support prompts (same order as the bank), never one of the domain's query responses (the outer data)."""
    out = {}
    for name in sorted(split.meta_train):
        domain = split.meta_train[name]
        support = domain.support_prompts[: cfg.meta.bank_size or None]
        if banks[name].prompts[: len(support)] != [p.prompt for p in support]:
            raise ValueError(f"the sample bank of {name} does not hold its support prompts in the split's order")
        outer = [t for pair in domain.query_pairs for t in (pair.chosen, pair.rejected)]
        out[name] = DemonstrationSet.build(policy, [p.prompt for p in support], [p.reference for p in support], outer)
        if len(out[name]) == 0:
            raise UserError(f"meta.inner_candidates=samples+demos: meta-train domain {name} has no support prompt with "
                            "a human continuation (`reference`); give its prompts a reference (data.prompts_path) or "
                            "set meta.inner_candidates=samples")
    return out


def domain_task(name: str, inner: list[list[int]], query: list[int], banks: dict[str, SampleBank],
                queries: dict[str, PreferenceSet], demos: dict[str, DemonstrationSet] | None, rm: RewardModel,
                policy: Policy, theta_d: dict[str, torch.Tensor] | None = None,
                sample_seeds: list[int] | None = None) -> DomainTask:
    """One drawn domain's DomainTask: its inner batches (with the same support prompts' demonstrations under
    samples+demos) and its query pairs. From theta_init the inner samples are read from the pi_ref bank; from a warm
    theta_d they are drawn fresh from pi_theta_d (seeded by `sample_seeds`, one per inner step): reweighting pi_ref
    samples far off their support is what the warm start must not do (method.md)."""
    pad = policy.tokenizer.pad_token_id
    bank = banks[name]
    if theta_d is None:
        samples = [bank.select(b, pad, rm) for b in inner]
    else:
        samples = [draw_samples(policy, theta_d, [bank.prompts[i] for i in b], [bank.prompt_ids[i] for i in b],
                                bank.n, seed, rm) for b, seed in zip(inner, sample_seeds)]
    return DomainTask(name, samples, queries[name].select(query, pad, rm),
                      None if demos is None else [demos[name].select(b, pad, rm) for b in inner], theta_d)


def warm_sample_seed(seed: int, step: int, domain: int, k: int) -> int:
    """The generator seed of a warm-started domain's fresh samples: a function of (seed, step, domain, inner step),
    so that a resumed run draws exactly what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, step, domain, k]).generate_state(1)[0])


def is_reset_step(step: int, meta: MetaConfig) -> bool:
    """meta.inner_start=warm: every domain's theta_d is theta_init again at steps 1, 1 + R, 1 + 2R, ... (R =
    meta.inner_reset; R = 1 is the init start)."""
    return (step - 1) % meta.inner_reset == 0


def share_inner_thetas(adapted: dict[str, dict[str, torch.Tensor]], drawn: list, template: dict[str, torch.Tensor],
                       rank: int, world: int) -> None:
    """Every process gets every drawn domain's theta_K: domain j of the meta-batch was adapted by process j % world
    (drawn[rank::world]), which broadcasts it (a domain can fall to another process at a later step)."""
    for j, (name, _, _) in enumerate(drawn):
        owner = j % world
        theta = adapted[name] if owner == rank else {k: torch.empty_like(v) for k, v in template.items()}
        for k in sorted(theta):
            torch.distributed.broadcast(theta[k], src=owner)
        adapted[name] = theta


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
        from oodpl.runtime.progress import step as progress_step
        from oodpl.train.rm_train import fit_reward_model

        # every process takes part: train_reward_model is data-parallel, and its collectives would hang a call from
        # the main process alone under DDP / DeepSpeed. Its own Accelerator: accelerate ties one DeepSpeed engine
        # to an Accelerator, and the run's is meta-training's. The main process saves the result.
        pooled = split.pooled_pairs()
        with progress_step(f"training the warm-start reward model (meta.init: bt) on {len(pooled)} pooled pairs"):
            rm, _ = fit_reward_model(cfg, pooled, seed=cfg.seed)
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
               stop_after: int | None = None, init_reward_model: str | Path | None = None,
               split: DomainSplit | None = None, policy: Policy | None = None,
               banks: dict[str, SampleBank] | None = None) -> dict:
    """Meta-train r_phi over the split's meta-train domains; returns a summary. `stop_after` ends the process's work
    after that many outer steps of this call (tests use it to simulate interruptions); `init_reward_model`: phi_0
    for meta.init=bt (see initial_reward_model).

    Inputs the caller already holds are handed in rather than rebuilt: `split` (default: OUTPUT/split.json of a run
    being resumed, else built from cfg.data), `policy` at its LoRA initialisation (default: loaded from cfg.policy
    with cfg.seed) and `banks`, pi_ref sample banks of the split's meta-train domains (default: OUTPUT/bank/, built
    once).

    The output directory is locked for the whole run (a second process on it exits with one line naming this one's
    pid); a start that fails (bad data, model, checkpoint, ...) removes what it created (rundir.open_run)."""
    accelerator = accelerator or make_accelerator()
    with open_run(output, "meta-train", cfg.fingerprint(), cfg, enabled=accelerator.is_main_process,
                  extendable=BUDGET_KEYS, resume=resume) as run:
        accelerator.wait_for_everyone()
        return _meta_train(cfg, run, resume, accelerator, stop_after, init_reward_model, split, policy, banks)


def _meta_train(cfg: Config, run: Run, resume: bool, accelerator, stop_after: int | None,
                init_reward_model: str | Path | None, split: DomainSplit | None, policy: Policy | None,
                banks: dict[str, SampleBank] | None) -> dict:
    main = accelerator.is_main_process
    progress = not cfg.quiet and main
    layout, run_dir = run.layout, run.layout.root
    final_dir = layout.reward_model
    if layout.summary.exists() and final_dir.exists():
        summary = json.loads(layout.summary.read_text())
        if not resume or summary.get("outer_steps") == cfg.meta.outer_steps:
            return summary
        # --resume with a larger meta.outer_steps: the finished run continues from its last checkpoint
    has_ckpt = layout.latest_checkpoint.exists()
    if has_ckpt and not resume:
        raise UserError(f"{run_dir} holds an unfinished meta-training run; pass --resume to continue it or choose "
                        "another --output")
    seed_everything(cfg.seed)
    if split is None:
        split = load_or_build_split(run.layout.split, cfg.data)
    if not layout.split.exists():  # a new run: split.json, then config.yaml (the main process writes)
        run.save_split(split)
        run.write_config()
    if len(split.meta_train) == 0:
        raise UserError("the split has no meta-train domains; check data.meta_train_domains / held_out_domains")

    timings: dict[str, float] = {}
    with phase(timings, "load_models"):
        if policy is None:
            policy = place(load_policy(cfg.policy, seed=cfg.seed), accelerator)
        rm = initial_reward_model(cfg, split, run_dir, init_reward_model, accelerator)
        place(rm, accelerator)
    with phase(timings, "sample_bank"):
        if banks is None:
            banks = load_or_build_banks(policy, split, cfg, layout.bank, accelerator, progress)
    with phase(timings, "query_sets"):
        queries = build_query_sets(policy, split)
        demos = (build_demonstration_sets(policy, split, cfg, banks)
                 if cfg.meta.inner_candidates == "samples+demos" else None)
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
    if resume:  # the settings this (possibly extended) run goes on with
        run.write_config()
    warm = cfg.meta.inner_start == "warm"
    # theta_d of every domain drawn since the last reset (absent: theta_init); held by every process, checkpointed
    inner_thetas = load_inner_thetas(run_dir, policy.theta_init()) if warm and start > 0 else {}
    run.commit()  # start-up done: from here on a failure keeps the run's files for --resume
    logger = MetricsLogger(run_dir, cfg.report_to, enabled=main, resume_step=start,
                           config=cfg.to_dict(), tracking=cfg.tracking, stage="meta-train")
    mode = resolved_hypergrad(cfg.meta)
    if warm and main:
        notice(f"meta.inner_start=warm (reset every {cfg.meta.inner_reset} outer steps): the hypergradient is taken "
               "through each outer step's own K inner steps (truncated: theta_d's dependence on earlier rewards is "
               "dropped); inner samples are drawn fresh from pi_theta_d")
    bar = tqdm(total=cfg.meta.outer_steps, initial=start, desc=f"meta-train ({mode}, K={cfg.meta.inner_steps})",
               disable=not progress, unit="step")
    done_here = 0
    step = start
    for step in range(start + 1, cfg.meta.outer_steps + 1):
        t0 = time.perf_counter()
        step_times: dict[str, float] = {}
        drawn = draw_tasks(step, cfg, names, banks, queries)
        mine = drawn[rank::world]
        if warm and is_reset_step(step, cfg.meta):
            inner_thetas.clear()
        with phase(step_times, "bank_reads"):
            tasks = [domain_task(name, inner, q, banks, queries, demos, rm, policy, inner_thetas.get(name),
                                 [warm_sample_seed(cfg.seed, step, names.index(name), k) for k in range(len(inner))])
                     for name, inner, q in mine]
        parts: dict[str, list[torch.Tensor]] = {}
        adapted: dict[str, dict[str, torch.Tensor]] | None = {} if warm else None
        if sharded:  # DeepSpeed's backward reduce-scatters the gradients (a mean over processes), clips and steps
            stats = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn) / world,
                                  timings=step_times, backward=accelerator.backward, parts=parts, adapted=adapted)
            grad_norm = float(accelerator.deepspeed_engine_wrapped.get_global_grad_norm() or 0.0)
            norms = dict.fromkeys(("hypergrad_term_norm", "bt_term_norm", "grad_ratio"))  # not measured apart
        else:
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            stats = meta_gradient(policy, rm, tasks, cfg.meta, cfg.rloo, scale=len(drawn), timings=step_times,
                                  parts=parts, adapted=adapted) if tasks else {}
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
        if warm:  # theta_K of this step's domains is their theta_d from now on
            if world > 1:
                share_inner_thetas(adapted, drawn, policy.theta_init(), rank, world)
            inner_thetas.update(adapted)
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
            save_checkpoint(run_dir, step, rm, policy, optimizer, accelerator, inner_thetas if warm else None)
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            bar.close()
            logger.close()
            return {"stopped_at": step}
    bar.close()
    logger.close()
    summary = {"outer_steps": cfg.meta.outer_steps, "hypergrad": mode, "domains": names,
               "timings": timings, "reward_model": str(final_dir)}
    if warm:
        summary["inner_start"] = {"mode": "warm", "inner_reset": cfg.meta.inner_reset,
                                  "hypergradient": "truncated at theta_d: through each outer step's own K inner steps"}
    if demos is not None:  # demonstrations per domain (support prompts with a reference not among the query responses)
        summary["demonstrations"] = {name: len(d) for name, d in demos.items()}
    save_checkpoint(run_dir, step, rm, policy, optimizer, accelerator, inner_thetas if warm else None)
    rm.model = accelerator.unwrap_model(rm.model)
    if main:
        rm.save(final_dir)
        atomic_write_json(layout.summary, summary)
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
    from oodpl.core.objectives import bradley_terry_loss

    layout = RunLayout(Path(output))
    if layout.summary.exists() and layout.reward_model.exists():
        return json.loads(layout.summary.read_text())
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
    rm.save(layout.reward_model)
    atomic_write_text(layout.metrics, "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"outer_steps": cfg.meta.outer_steps, "objective": "bt-only", "init": str(init_reward_model),
               "domains": names, "reward_model": str(layout.reward_model)}
    atomic_write_json(layout.summary, summary)
    return summary
