"""`oodpl select`: choose meta-training hyper-parameters by leave-one-domain-out within the meta-train domains.

Held-out domains are never looked at. For every candidate setting of the grid (`select.grid`, `meta.*` keys only) and
every fold (one meta-train domain left out), the general reward model is meta-trained on the other meta-train domains
and scored on the left-out one, exactly as the benchmark later scores it on held-out domains, only with meta-train
labels:

    outer_loss     F_d(phi) with lambda_bt = 0: K inner RLOO steps on d's support prompts (its pi_ref sample bank)
                   under r_phi, then the DPO-style loss of the adapted policy on d's human query pairs (lower = better;
                   the meta-objective of method.md on a domain the reward model has not seen)
    pair_accuracy  how often r_phi ranks d's human pairs the human way (higher = better)

`select.criterion` picks which one decides; the other is reported. Candidates are compared at their own inner settings
(K, alpha); the policy-side settings (rloo.*) stay fixed, so outer losses are comparable across the grid.

Layout of DIR (every unit is written atomically and skipped on a rerun):

    DIR/oodpl_run.json, DIR/config.yaml, DIR/split.json
    DIR/bank/<domain>.pt                       pi_ref samples of every meta-train domain, generated once
    DIR/candidate-I/fold-<domain>/             a meta_train run directory (reward_model/, metrics.jsonl, ...)
    DIR/candidate-I/fold-<domain>/score.json   the left-out domain's scores
    DIR/selection.json, DIR/selection.md       every candidate's per-fold and mean scores; the chosen overrides
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from .bilevel import DomainTask, meta_objective
from .config import Config, dump_config, with_overrides
from .data.split import DomainSplit, build_split
from .errors import UserError, atomic_write_json, atomic_write_text, prepare_run_dir
from .objectives import pair_accuracy

CRITERIA = {"outer_loss": min, "pair_accuracy": max}


def candidates(cfg: Config) -> list[dict]:
    """The grid's settings in a fixed order (keys sorted, values as listed), each checked against the config."""
    grid = cfg.select.grid
    if not grid:
        raise UserError("select.grid is empty; give candidate values, e.g. --set 'select.grid={meta.outer_lr: "
                        "[1e-4, 3e-4], meta.lambda_bt: [0.0, 0.1]}'")
    for key, values in grid.items():
        if not key.startswith("meta."):
            raise UserError(f"select.grid: {key!r} is not a meta-training setting; only meta.* keys are selected "
                            "(the policy, reward model and meta-test settings are shared by every method)")
        if key == "meta.bank_size":
            raise UserError("select.grid: meta.bank_size cannot be selected (every candidate shares one sample bank)")
        if not isinstance(values, list) or not values:
            raise UserError(f"select.grid.{key}: give a non-empty list of candidate values")
    keys = sorted(grid)
    out = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    for c in out:
        with_overrides(cfg, c, where="select.grid")  # raises UserError on an unknown key or a bad value
    return out


def folds(cfg: Config, names: list[str]) -> list[str]:
    if len(names) < 2:
        raise UserError(f"leave-one-domain-out needs at least 2 meta-train domains, the split has {len(names)}")
    k = cfg.select.folds
    if k <= 0 or k >= len(names):
        return list(names)
    return sorted(np.random.default_rng([cfg.data.seed, 17]).choice(names, size=k, replace=False).tolist())


def score_fold(policy, rm, name: str, bank, query, cfg: Config, pad: int) -> dict:
    """outer_loss and pair_accuracy of r_phi on a left-out domain, averaged over `select.eval_draws` inner batches
    (drawn as meta-training draws them, at steps past any run's end) and scored on all of its human query pairs."""
    from .metatrain import draw_tasks

    meta = copy.deepcopy(cfg.meta)
    meta.lambda_bt = 0.0  # the policy-side meta-objective only: comparable across lambda_bt candidates
    q = query.select(list(range(len(query))), pad, rm)
    losses = []
    for j in range(cfg.select.eval_draws):
        [(_, inner, _)] = draw_tasks(1_000_003 + j, cfg, [name], {name: bank}, {name: query})
        samples = [bank.select(b, pad, rm) for b in inner]
        losses.append(meta_objective(policy, rm, [DomainTask(name, samples, q)], meta, cfg.rloo))
    with torch.no_grad():
        acc = pair_accuracy(rm.forward_encoded(q.rm_chosen), rm.forward_encoded(q.rm_rejected))
    return {"outer_loss": float(np.mean(losses)), "outer_loss_draws": losses, "pair_accuracy": float(acc),
            "pairs": len(query)}


def select_hyperparameters(cfg: Config, output: str | Path) -> dict:
    from .distributed import make_accelerator
    from .benchmark import load_rm
    from .metatrain import build_query_sets, load_or_build_banks, meta_train
    from .models import load_policy

    grid = candidates(cfg)
    out = Path(output)
    prepare_run_dir(out, "select", cfg.fingerprint())
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    split = DomainSplit.load(out / "split.json") if (out / "split.json").exists() else build_split(cfg.data)
    split.save(out / "split.json")
    names = sorted(split.meta_train)
    left_out = folds(cfg, names)

    accelerator = make_accelerator()
    progress = not cfg.quiet
    policy = load_policy(cfg.policy, seed=cfg.seed)
    pad = policy.tokenizer.pad_token_id
    banks = load_or_build_banks(policy, split, cfg, out / "bank", accelerator, progress)  # once for every run
    queries = build_query_sets(policy, split, left_out)  # log pi_ref of the scored domains' pairs, once

    results = []
    for i, overrides in enumerate(grid):
        c = with_overrides(cfg, overrides, where="select.grid")
        per_fold = {}
        for d in left_out:
            run = out / f"candidate-{i}" / f"fold-{d}"
            score_path = run / "score.json"
            if not score_path.exists():
                fc = copy.deepcopy(c)
                fc.data.meta_train_domains = [n for n in names if n != d]
                fc.data.max_domains = None
                fc.quiet = True
                prepare_run_dir(run, "meta-train", fc.fingerprint())  # claimed before the shared bank is copied in
                (run / "bank").mkdir(parents=True, exist_ok=True)
                for n in fc.data.meta_train_domains:  # reuse the shared bank instead of regenerating it
                    if not (run / "bank" / f"{n}.pt").exists():
                        shutil.copyfile(out / "bank" / f"{n}.pt", run / "bank" / f"{n}.pt")
                if progress:
                    print(f"select: candidate {i + 1}/{len(grid)} {overrides}, left out {d}", flush=True)
                summary = meta_train(fc, run, resume=(run / "checkpoints" / "latest").exists(),
                                     accelerator=accelerator)
                rm = load_rm(Path(summary["reward_model"]), cfg)
                atomic_write_json(score_path, score_fold(policy, rm, d, banks[d], queries[d], c, pad))
            per_fold[d] = json.loads(score_path.read_text())
        mean = {k: float(np.mean([f[k] for f in per_fold.values()])) for k in ("outer_loss", "pair_accuracy")}
        results.append({"candidate": i, "overrides": overrides, "folds": per_fold, "mean": mean})

    pick = CRITERIA[cfg.select.criterion]
    finite = [r for r in results if math.isfinite(r["mean"][cfg.select.criterion])]
    if not finite:
        raise UserError("select: every candidate diverged (non-finite scores); narrow select.grid")
    best = pick(finite, key=lambda r: r["mean"][cfg.select.criterion])
    selection = {"criterion": cfg.select.criterion, "folds": left_out, "held_out_domains_untouched": sorted(split.held_out),
                 "candidates": results, "best": best["overrides"],
                 "set_flags": " ".join(f"--set {k}={v}" for k, v in best["overrides"].items())}
    atomic_write_json(out / "selection.json", selection)
    atomic_write_text(out / "selection.md", render_selection(selection))
    return selection


def render_selection(sel: dict) -> str:
    keys = sorted(sel["best"])
    lines = ["# Leave-one-domain-out selection (meta-train domains only)", "",
             f"Criterion: **{sel['criterion']}** ({'lower' if sel['criterion'] == 'outer_loss' else 'higher'} is "
             f"better), mean over the left-out meta-train domains {', '.join(sel['folds'])}. Held-out domains "
             f"({', '.join(sel['held_out_domains_untouched'])}) were not used.", "",
             "| " + " | ".join(keys) + " | outer_loss | pair_accuracy | chosen |",
             "|" + "---|" * (len(keys) + 3)]
    for r in sel["candidates"]:
        mark = "yes" if r["overrides"] == sel["best"] else ""
        lines.append("| " + " | ".join(str(r["overrides"][k]) for k in keys)
                     + f" | {r['mean']['outer_loss']:.4f} | {r['mean']['pair_accuracy']:.3f} | {mark} |")
    lines += ["", f"Use it: `{sel['set_flags']}` (or `benchmark.select: true` applies it to the meta-rm methods).", ""]
    return "\n".join(lines)
