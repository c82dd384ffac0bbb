"""`oodpl select`: choose each tuned method's settings by leave-one-domain-out within the meta-train domains.

Held-out domains are never looked at. Every method that has a learning rate gets its own grid (`select.grids`,
method -> {dotted key: values}; `select.grid` is shorthand for meta-rm's) and the same criterion; give each the same
number of candidates (method.md, Baselines: equal tuning budget). For every candidate and every fold (one meta-train
domain d left out) the method is trained on the other meta-train domains exactly as the benchmark trains it, and
scored on d with d's human query pairs:

    pair_accuracy  how often the method's reward ranks d's pairs the human way (dpo: its implicit reward)
    outer_loss     the meta-objective on d with lambda_bt = 0: for a reward model, K inner RLOO steps on d's support
                   prompts (its pi_ref sample bank) under r, then the DPO-style loss of the adapted policy on d's pairs
                   (lower = better); for dpo, the DPO loss of the trained policy on d's pairs

`select.criterion` decides; the other is reported. Order: erm-rm first, because erm-rm-extra and meta-rm start from
the fold's erm-rm (trained with erm-rm's chosen settings), as they start from the seed's erm-rm in the benchmark.

Layout of DIR (every unit is written atomically and skipped on a rerun):

    DIR/oodpl_run.json, DIR/config.yaml, DIR/split.json, DIR/bank/<domain>.pt (pi_ref samples, generated once)
    DIR/<method>/candidate-I/fold-<domain>/            the fold's training run (reward_model/, metrics.jsonl, ...)
    DIR/<method>/candidate-I/fold-<domain>/score.json  the left-out domain's scores
    DIR/init/fold-<domain>/reward_model                the fold's erm-rm (warm start of erm-rm-extra and meta-rm)
    DIR/selection.json, DIR/selection.md               every candidate's per-fold and mean scores; the choices
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch

from oodpl.experiment import methods as registry
from oodpl.core.bilevel import DomainTask, inner_step_effect
from oodpl.config import Config, with_overrides
from oodpl.data.split import DomainSplit, load_or_build_split
from oodpl.errors import UserError, atomic_write_json, atomic_write_text
from oodpl.models.policy import PolicyAtInit
from oodpl.models.precision import place
from oodpl.core.objectives import pair_accuracy
from oodpl.runtime.rundir import RunLayout, open_run

CRITERIA = {"outer_loss": min, "pair_accuracy": max}


def tunable() -> list[str]:
    """The methods with their own grid, in selection order: the registry's, where a warm start (erm-rm) comes before
    its users (erm-rm-extra and meta-rm start from the fold's erm-rm trained with erm-rm's chosen settings)."""
    return registry.names(lambda m: m.tunable)


def method_grids(cfg: Config, methods: list[str] | None = None) -> dict[str, dict[str, list]]:
    grids = {m: dict(g) for m, g in cfg.select.grids.items()}
    if cfg.select.grid and "meta-rm" not in grids:
        grids["meta-rm"] = dict(cfg.select.grid)
    order = tunable()
    for m in grids:
        if m not in order:
            raise UserError(f"select.grids: {m!r} is not a tuned method; choose from {', '.join(order)}")
    if methods is not None:
        grids = {m: g for m, g in grids.items() if m in methods}
    if not grids:
        raise UserError("select.grids is empty; give candidate values, e.g. --set 'select.grids={meta-rm: "
                        "{meta.outer_lr: [1e-4, 3e-4]}, erm-rm: {train_rm.lr: [1e-4, 3e-4]}}'")
    return {m: grids[m] for m in order if m in grids}


def candidates(cfg: Config, grid: dict[str, list] | None = None) -> list[dict]:
    """A grid's settings in a fixed order (keys sorted, values as listed), each checked against the config."""
    grid = cfg.select.grid if grid is None else grid
    if not grid:
        raise UserError("select.grid is empty; give candidate values, e.g. --set 'select.grid={meta.outer_lr: "
                        "[1e-4, 3e-4], meta.lambda_bt: [0.0, 0.1]}'")
    for key, values in grid.items():
        if key in ("meta.bank_size",) or key.split(".")[0] in ("data", "policy", "reward", "eval", "select"):
            raise UserError(f"select.grid: {key!r} cannot be selected (it is shared by every method and run)")
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
    """What r_phi's inner step does on a left-out domain, averaged over `select.eval_draws` inner batches (drawn as
    meta-training draws them, at steps past any run's end) and scored on all of its human query pairs: the outer loss
    after the step (`outer_loss`, the selection criterion) and before it (at pi_ref), the step's length and KL, and
    r_phi's pair accuracy on those pairs."""
    from oodpl.train.metatrain import draw_tasks

    meta = copy.deepcopy(cfg.meta)
    meta.lambda_bt = 0.0  # the policy-side meta-objective only: comparable across lambda_bt candidates
    q = query.select(list(range(len(query))), pad, rm)
    effects = []
    for j in range(cfg.select.eval_draws):
        [(_, inner, _)] = draw_tasks(1_000_003 + j, cfg, [name], {name: bank}, {name: query})
        samples = [bank.select(b, pad, rm) for b in inner]
        effects.append(inner_step_effect(policy, rm, DomainTask(name, samples, q), meta, cfg.rloo))
    with torch.no_grad():
        acc = pair_accuracy(rm.forward_encoded(q.rm_chosen), rm.forward_encoded(q.rm_rejected))
    mean = {k: float(np.mean([e[k] for e in effects])) for k in effects[0]}
    return {"outer_loss": mean.pop("outer_loss_after"), "outer_loss_draws": [e["outer_loss_after"] for e in effects],
            **mean, "pair_accuracy": float(acc), "pairs": len(query)}


class _Selection:
    """One selection run: shared banks and query sets, then every method x candidate x fold."""

    def __init__(self, cfg: Config, out: Path, split: DomainSplit):
        from oodpl.runtime.distributed import make_accelerator
        from oodpl.train.metatrain import build_query_sets, load_or_build_banks
        from oodpl.models.policy import load_policy

        self.cfg, self.out, self.split = cfg, out, split
        self.names = sorted(split.meta_train)
        self.left_out = folds(cfg, self.names)
        self.accelerator = make_accelerator()
        self.progress = not cfg.quiet
        self.policy_at_init = PolicyAtInit(place(load_policy(cfg.policy, seed=cfg.seed), self.accelerator))
        self.policy = self.policy_at_init.get()
        self.pad = self.policy.tokenizer.pad_token_id
        self.banks = load_or_build_banks(self.policy, split, cfg, RunLayout(out).bank, self.accelerator,
                                         self.progress)
        self.queries = build_query_sets(self.policy, split, self.left_out)  # log pi_ref of the scored domains, once
        self.best: dict[str, dict] = {}

    def fold_pairs(self, d: str):
        return [p for n in self.names if n != d for p in self.split.meta_train[n].query_pairs]

    def fold_split(self, d: str) -> DomainSplit:
        return DomainSplit(self.split.task, {n: v for n, v in self.split.meta_train.items() if n != d}, {})

    def init_rm(self, d: str) -> Path:
        """The fold's erm-rm with erm-rm's chosen settings: the warm start of erm-rm-extra and meta-rm."""
        path = self.out / "init" / f"fold-{d}"
        rm = RunLayout(path).reward_model
        if not (rm / "config.json").exists():
            c = with_overrides(self.cfg, self.best.get(registry.ERM, {}), where="select")
            registry.train_bt(self.fold_job(c, d, path))
        return rm

    def fold_job(self, c: Config, d: str, run: Path, warm_start: str | None = None,
                 target_prompts: bool = False) -> registry.TrainJob:
        """The fold's inputs: everything but domain d (its pairs, its meta-train domains and their shared banks);
        with `target_prompts`, d's pi_ref samples without labels (d stands for a held-out domain, whose adaptation
        prompts' samples such a method sees in the benchmark)."""
        from oodpl.train.field_rms import prompt_groups_from_banks

        return registry.TrainJob(c, run, pairs=self.fold_pairs(d), split=self.fold_split(d),
                                 init=self.init_rm(d) if warm_start else None, policy=self.policy_at_init.get,
                                 banks={n: b for n, b in self.banks.items() if n != d}, accelerator=self.accelerator,
                                 what=f"fold {d}",
                                 target_samples=prompt_groups_from_banks({d: self.banks[d]}) if target_prompts
                                 else None)

    def run_fold(self, method: str, c: Config, d: str, run: Path) -> dict:
        """Train `method` with candidate config `c` without domain d (its own trainer, as the benchmark trains it),
        then score it on d by what it outputs: a reward model's inner step and pair accuracy, a policy's DPO loss."""
        from oodpl.models.reward import load_reward_checkpoint

        m = registry.get(method)
        c = copy.deepcopy(c)
        c.quiet = True
        m.trainer(self.fold_job(c, d, run, m.warm_start, m.shifted_samples))
        if m.output == registry.POLICY:
            return self.score_policy(c, d)
        rm = load_reward_checkpoint(RunLayout(run).reward_model, self.cfg.reward)
        place(rm, self.accelerator)
        return score_fold(self.policy_at_init.get(), rm, d, self.banks[d], self.queries[d], c, self.pad)

    def score_policy(self, c: Config, d: str) -> dict:
        from oodpl.train.dpo import evaluate_dpo_loss, implicit_reward_scores

        pairs = self.split.meta_train[d].query_pairs
        rc, rr = implicit_reward_scores(self.policy, pairs, c.rloo.beta)
        loss = evaluate_dpo_loss(self.policy, self.queries[d], c.rloo.beta)
        return {"outer_loss": loss, "pair_accuracy": pair_accuracy(rc, rr), "pairs": len(pairs)}

    def select(self, method: str, grid: dict[str, list]) -> dict:
        results = []
        for i, overrides in enumerate(candidates(self.cfg, grid)):
            base = self.cfg if method == registry.ERM else with_overrides(self.cfg, self.best.get(registry.ERM, {}),
                                                                                          where="select")
            c = with_overrides(base, overrides, where="select.grids")
            per_fold = {}
            for d in self.left_out:
                run = self.out / method / f"candidate-{i}" / f"fold-{d}"
                score_path = run / "score.json"
                if not score_path.exists():
                    if self.progress:
                        print(f"select {method}: candidate {i + 1} {overrides}, left out {d}", flush=True)
                    atomic_write_json(score_path, self.run_fold(method, c, d, run))
                per_fold[d] = json.loads(score_path.read_text())
            mean = {k: float(np.mean([f[k] for f in per_fold.values()])) for k in ("outer_loss", "pair_accuracy")}
            results.append({"candidate": i, "overrides": overrides, "folds": per_fold, "mean": mean})
        criterion = self.cfg.select.criterion
        finite = [r for r in results if math.isfinite(r["mean"][criterion])]
        if not finite:
            raise UserError(f"select {method}: every candidate diverged (non-finite scores); narrow its grid")
        best = CRITERIA[criterion](finite, key=lambda r: r["mean"][criterion])
        self.best[method] = best["overrides"]
        return {"candidates": results, "best": best["overrides"],
                "set_flags": " ".join(f"--set {k}={v}" for k, v in best["overrides"].items())}


def select_hyperparameters(cfg: Config, output: str | Path, methods: list[str] | None = None) -> dict:
    """Leave-one-meta-train-domain-out selection for every method with a grid (or those of `methods` that have
    one). Writes DIR/selection.json and DIR/selection.md; returns the selection dict."""
    grids = method_grids(cfg, methods)
    for m, grid in grids.items():
        candidates(cfg, grid)  # every candidate checked before anything is written
    out = Path(output)
    with open_run(out, "select", cfg.fingerprint(), cfg) as run:
        split = load_or_build_split(run.layout.split, cfg.data)
        folds(cfg, sorted(split.meta_train))
        run.record(split)
        run.commit()
        study = _Selection(cfg, out, split)
        chosen = {m: study.select(m, grid) for m, grid in grids.items()}
        lodo = {m: {d: f["outer_loss"] for d, f in next(r for r in v["candidates"]
                                                        if r["overrides"] == v["best"])["folds"].items()}
                for m, v in chosen.items()}
        selection = {"criterion": cfg.select.criterion, "folds": study.left_out,
                     "held_out_domains_untouched": sorted(split.held_out), "methods": chosen,
                     "lodo_outer_loss": lodo}
        atomic_write_json(run.layout.selection, selection)
        atomic_write_text(out / "selection.md", render_selection(selection))
        return selection


def render_selection(sel: dict) -> str:
    lines = ["# Leave-one-domain-out selection (meta-train domains only)", "",
             f"Criterion: **{sel['criterion']}** ({'lower' if sel['criterion'] == 'outer_loss' else 'higher'} is "
             f"better), mean over the left-out meta-train domains {', '.join(sel['folds'])}. Held-out domains "
             f"({', '.join(sel['held_out_domains_untouched'])}) were not used.", ""]
    for method, v in sel["methods"].items():
        keys = sorted(v["best"])
        lines += [f"## {method}", "", "| " + " | ".join(keys) + " | outer_loss | pair_accuracy | chosen |",
                  "|" + "---|" * (len(keys) + 3)]
        for r in v["candidates"]:
            mark = "yes" if r["overrides"] == v["best"] else ""
            lines.append("| " + " | ".join(str(r["overrides"][k]) for k in keys)
                         + f" | {r['mean']['outer_loss']:.4f} | {r['mean']['pair_accuracy']:.3f} | {mark} |")
        lines += ["", f"Use it: `{v['set_flags']}`.", ""]
    return "\n".join(lines)
