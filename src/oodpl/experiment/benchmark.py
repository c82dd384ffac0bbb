"""`oodpl benchmark`: every method x held-out domain x seed, then results.json (v2), results.csv, report.md and plots.

Methods (cfg.benchmark.methods) are defined once in methods.py (method.md, "Baselines"): reference, erm-rm,
erm-rm-extra, dpo, oracle-rm, gold-reward, meta-rm and its ablations; each one's trainer is handed the run's split,
the pairs it may use, its warm start and the seed's policy. All use the same policy and reward backbones, the same
meta-train pairs, the same meta-test optimiser (metatest.optimise_policy) and the same reward standardisation.

Seeds: cfg.benchmark.seeds; seed s sets cfg.seed = s (initialisation, sampling, minibatches) while data.seed stays
fixed, so every seed sees the same domain split. Tuning: with benchmark.select, `oodpl select` first chooses each
tuned method's learning rate (select.grids) by leave-one-meta-train-domain-out; held-out domains are never used.

Layout of the output directory (each finished unit is written atomically and skipped on a rerun):

    DIR/oodpl_run.json, DIR/config.yaml, DIR/split.json
    DIR/select/                                      the selection run (selection.json / .md) with benchmark.select
    DIR/shared/<domain>/agreement.json               ONE set of pi_ref samples per held-out domain + gold scores
    DIR/shared/<domain>/adapt_reference.json         pi_ref samples on the adaptation prompts (reward scales)
    DIR/seed-S/erm-rm/reward_model/, DIR/seed-S/erm-rm-extra/, DIR/seed-S/oracle-rm/<domain>/reward_model/
    DIR/seed-S/meta-rm/ (and the ablations)          meta_train run directories (reward_model/, metrics.jsonl)
    DIR/seed-S/dpo/policy_trainable.pt, DIR/seed-S/dpo/policy/            the DPO policy (raw tensors; PEFT adapter dir)
    DIR/seed-S/policies/<method>/<domain>/beta_<b>/  every meta-tested policy as a PEFT adapter directory
    DIR/seed-S/samples/<method>/<domain>/beta-<b>.json (or policy.json)   meta-test history + evaluation samples
    DIR/seed-S/eval/<method>/<domain>.json           one cell: metrics, n, units, frontier
    DIR/seed-S/units/<unit>.json                     "done" markers with the unit's wall time
    DIR/results.json, results.csv, report.md, plots/*.png

results.json is `results.Results.to_json()`: the v2 schema is defined in results.py (cells with metrics, n, per-unit
values, frontier and matched KL; the sections beside them); report.py reads it back as `Results`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oodpl.config import Config
from oodpl.data.split import DomainSplit, load_or_build_split, require_oracle_pairs
from oodpl.errors import UserError, atomic_write_json
from oodpl.evaluation.evaluate import (agreement, dpo_pl, gold_scores, load_samples, load_shared_reference_samples, prompt_clusters,
                       references_for, rm_pl, rm_sample_scores, sample_metrics, shared_reference_samples)
from oodpl.experiment import methods as registry
from oodpl.adapt.metatest import (adapt_reference_samples, eval_seed, judge_fn, meta_test_to_file, policy_samples_to_file,
                       reference_reward_scale, reward_model_fn)
from oodpl.models.policy import PolicyAtInit
from oodpl.models.precision import place
from oodpl.experiment.results import Cell, Results
from oodpl.runtime.rundir import RunLayout, open_run
from oodpl.runtime.runlog import MetricsLogger, provenance, seed_everything
from oodpl.evaluation.stats import gold_at_matched_kl

LEFT_OUT_DOMAINS = 3  # meta-train-pool domains left out of training that the diagnostic scores (at most)


def _fmt_beta(b: float) -> str:
    return f"{b:g}"


def _seed_policy(cfg: Config, accelerator) -> PolicyAtInit:
    """The seed's policy (LoRA initialisation of that seed), loaded on first use and restored before each use."""
    from oodpl.models.policy import load_policy

    return PolicyAtInit(loader=lambda: place(load_policy(cfg.policy, seed=cfg.seed), accelerator))


class Benchmark:
    def __init__(self, cfg: Config, output: str | Path):
        self.cfg = cfg
        self.dir = Path(output)
        self.layout = RunLayout(self.dir)
        self.progress = not cfg.quiet
        unknown = [m for m in cfg.benchmark.methods if m not in registry.METHODS]
        if unknown:
            raise UserError(f"benchmark.methods: unknown method {unknown[0]!r}; choose from "
                            f"{', '.join(registry.METHODS)}")
        if not cfg.benchmark.methods:
            raise UserError("benchmark.methods is empty; list at least one method")
        if not cfg.benchmark.seeds:
            raise UserError("benchmark.seeds is empty; list at least one seed")
        # a warm start (erm-rm for erm-rm-extra and meta-rm, method.md "Initialisation") runs before its users
        self.methods = registry.with_warm_starts(cfg.benchmark.methods)
        registry.check_requirements(cfg, self.methods)
        self.seeds = list(dict.fromkeys(cfg.benchmark.seeds))
        self.betas = list(cfg.meta_test.beta_test)
        self._gold_cache: dict[str, list[float]] = {}
        self._rm_cache: dict[str, object] = {}
        self._scale_cache: dict[tuple[str, str], float] = {}
        # metrics of every training unit (RM training, dpo, meta-test steps) under seed-S/<unit>/: set by run()
        self.logger = MetricsLogger(self.dir, [], enabled=False)
        from oodpl.runtime.distributed import make_accelerator

        self.accelerator = make_accelerator()
        self.device = self.accelerator.device

    # --------------------------------------------------------------------------------------------------- paths
    def sdir(self, seed: int) -> Path:
        return self.dir / f"seed-{seed}"

    def marker(self, seed: int, unit: str) -> Path:
        return self.sdir(seed) / "units" / f"{unit.replace('/', '__')}.json"

    def select_dir(self) -> Path:
        return self.dir / "select"

    def shared_path(self, domain: str, name: str) -> Path:
        """shared/<domain>/<name>.json: the domain's pi_ref samples every seed and method shares."""
        return self.dir / "shared" / domain / f"{name}.json"

    def eval_path(self, seed: int, method: str, domain: str) -> Path:
        """seed-S/eval/<method>/<domain>.json: one cell's record (results.Cell)."""
        return self.sdir(seed) / "eval" / method / f"{domain}.json"

    def samples_path(self, seed: int, method: str, domain: str, beta: float | None) -> Path:
        name = "policy.json" if beta is None else f"beta-{_fmt_beta(beta)}.json"
        return self.sdir(seed) / "samples" / method / domain / name

    def meta_tested(self, seed: int) -> bool:
        """Whether this seed runs the meta-test and the generation metrics (benchmark.meta_test_seeds)."""
        k = self.cfg.benchmark.meta_test_seeds
        return k is None or self.seeds.index(seed) < k

    def sample_betas(self, method: str) -> list[float | None]:
        return self.betas if registry.get(method).optimised else [None]

    def train_dir(self, seed: int, method: str, domain: str | None = None) -> Path:
        """Where a method's training run goes: seed-S/<method>/ (per-domain methods: seed-S/<method>/<domain>/)."""
        return self.sdir(seed) / method / domain if registry.get(method).per_domain else self.sdir(seed) / method

    def rm_dir(self, seed: int, method: str, domain: str | None = None) -> Path | None:
        if registry.get(method).output != registry.REWARD_MODEL:
            return None
        return RunLayout(self.train_dir(seed, method, domain)).reward_model

    # ------------------------------------------------------------------------------------------------- caches
    def rm(self, path: Path):
        from oodpl.models.reward import load_reward_checkpoint

        key = str(path)
        if key not in self._rm_cache:
            self._rm_cache.clear()  # one RM in memory at a time
            rm = load_reward_checkpoint(path, self.cfg.reward)
            place(rm, self.accelerator)
            self._rm_cache[key] = rm
        return self._rm_cache[key]

    def gold(self, path: Path, domain: str) -> list[float]:
        key = str(path)
        if key not in self._gold_cache:
            samples, _ = load_samples(path)
            self._gold_cache[key] = gold_scores(self.judge, samples, self.refs[domain])
        return self._gold_cache[key]

    def config(self, s: int, method: str | None = None) -> Config:
        return registry.method_config(self.cfg, s, method, self.selected)

    # -------------------------------------------------------------------------------------------------- plan
    def plan(self) -> list[tuple[int, str, callable]]:
        """(seed, unit name, run function) in execution order."""
        units = []
        domains = sorted(self.split.held_out)
        first = self.seeds[0]
        if self.cfg.benchmark.select:
            units.append((first, "select", self.run_select))
        for di, d in enumerate(domains):
            units.append((first, f"shared/{d}", lambda d=d, di=di: self.shared_samples(d, di)))
        for s in self.seeds:
            pol = _seed_policy(self.config(s), self.accelerator)
            for m in self.methods:  # warm starts come first (registry.with_warm_starts)
                if registry.get(m).trainer is None:
                    continue
                for d in domains if registry.get(m).per_domain else [None]:
                    units.append((s, f"train/{m}" + (f"/{d}" if d else ""),
                                  lambda s=s, m=m, d=d, pol=pol: self.train(s, m, pol, d)))
            if self.cfg.benchmark.diagnostics:  # left-out: every reward model's leverage; fit: the bilevel methods'
                if any(registry.get(m).trainer is not None and not registry.get(m).per_domain for m in self.methods):
                    units.append((s, "diagnose/left-out", lambda s=s, pol=pol: self.left_out(s, pol)))
                if any(registry.get(m).bilevel for m in self.methods):
                    units.append((s, "diagnose/fit", lambda s=s, pol=pol: self.fit(s, pol)))
            erm = [registry.ERM] if registry.ERM in self.methods else []  # win_rate_vs_erm needs its samples
            sample_methods = list(dict.fromkeys(["reference"] + erm + self.methods)) if self.meta_tested(s) else []
            for m in sample_methods:
                for di, d in enumerate(domains):
                    for b in self.sample_betas(m):
                        tag = "policy" if b is None else f"beta-{_fmt_beta(b)}"
                        units.append((s, f"sample/{m}/{d}/{tag}",
                                      lambda s=s, m=m, d=d, di=di, b=b, pol=pol: self.sample(s, pol, m, d, di, b)))
            for m in self.methods:
                for d in domains:
                    units.append((s, f"eval/{m}/{d}", lambda s=s, m=m, d=d, pol=pol: self.evaluate(s, pol, m, d)))
        return units

    # ------------------------------------------------------------------------------------------------- units
    def run_select(self) -> None:
        from oodpl.experiment.selection import select_hyperparameters

        tuned = {registry.get(m).tuned_as for m in self.methods} - {None}
        select_hyperparameters(registry.method_config(self.cfg, self.seeds[0]), self.select_dir(),
                               methods=[m for m in registry.METHODS if m in tuned])

    def selection_summary(self) -> dict:
        """results.json "selection": per tuned method its criterion, folds, choice and one row per candidate (its
        settings and the mean scores over the left-out meta-train domains; per-fold scores stay in select/)."""
        sel = self.load_selection()
        return {m: {"criterion": sel["criterion"], "folds": sel["folds"], "best": v["best"],
                    "set_flags": v["set_flags"],
                    "candidates": [{**c["overrides"], **c["mean"]} for c in v["candidates"]]}
                for m, v in sel.get("methods", {}).items()}

    def load_selection(self) -> dict:
        path = RunLayout(self.select_dir()).selection
        if not (self.cfg.benchmark.select and path.exists()):
            return {}
        return json.loads(path.read_text())

    def shared_samples(self, d: str, di: int) -> None:
        """The domain's shared pi_ref samples: for rm_gold_agreement (evaluation prompts, with gold scores) and for
        the meta-test reward scales (adaptation prompts). pi_ref does not depend on the seed: drawn once."""
        policy = _seed_policy(self.config(self.seeds[0]), self.accelerator).get()
        ho = self.split.held_out[d]
        shared_reference_samples(self.shared_path(d, "agreement"), policy,
                                 [p.prompt for p in ho.eval_prompts], self.cfg.eval.agreement_samples,
                                 eval_seed(10_007, di), self.judge, self.refs[d])
        adapt_reference_samples(self.shared_path(d, "adapt_reference"), policy,
                                [p.prompt for p in ho.adapt_prompts], self.cfg, di)

    def train(self, s: int, method: str, pol: PolicyAtInit, domain: str | None = None) -> None:
        """One method's training for seed s (and held-out domain `domain` for per-domain methods), by its trainer
        (methods.py), handed the run's split, the pairs it may use, its warm start and the seed's policy."""
        m = registry.get(method)
        pairs = self.split.pooled_pairs()
        if m.per_domain:  # the held-out domain's own labels, at most as many as the pooled meta-train pairs
            pairs = self.split.held_out[domain].oracle_pairs[: max(1, len(pairs))]
            if len(pairs) < 2:
                raise UserError(f"held-out domain {domain} has {len(pairs)} oracle pairs; {method} needs at least 2")
        what = f"{method} {domain}" if domain else method
        job = registry.TrainJob(self.config(s, method), self.train_dir(s, method, domain), pairs=pairs,
                                split=self.split, init=self.rm_dir(s, m.warm_start) if m.warm_start else None,
                                policy=pol.get, accelerator=self.accelerator, progress=self.progress, what=what,
                                log=self.logger.child(f"seed-{s}/{what.replace(' ', '/')}").log,
                                export_base=self.layout.base_model,
                                target_samples=self.target_samples() if m.shifted_samples else None)
        m.trainer(job)

    def target_samples(self) -> list:
        """The shared pi_ref samples of every held-out domain's adaptation prompts (the prompts the meta-test aligns
        on), without labels: what a method with Method.shifted_samples sees of the held-out domains."""
        from oodpl.train.field_rms import prompt_groups_from_samples

        return [g for d in sorted(self.split.held_out)
                for g in prompt_groups_from_samples(load_samples(self.shared_path(d, "adapt_reference"))[0])]

    def left_out_split(self) -> DomainSplit:
        """Meta-train-pool domains no method trains on (left out by data.max_domains), fixed once per run."""
        from oodpl.data.split import left_out_split

        path = self.dir / "left_out_split.json"
        if not path.exists():
            left_out_split(self.cfg.data, self.split, LEFT_OUT_DOMAINS).save(path)
        return DomainSplit.load(path)

    def left_out(self, s: int, pol: PolicyAtInit) -> None:
        """Diagnostic (method.md, "Statistics and evidence", "Leverage"): on the left-out meta-train-pool domains,
        the outer loss before and after each reward model's inner step (meta-rm's inner settings for every RM), the
        step's length and KL, the RM's pair accuracy on the domain's human query pairs, and the leverage of the
        step (headroom, the oracle's real drop and KL, each RM's and the gold judge's alignment). No held-out
        domain is used."""
        split = self.left_out_split()
        record = self.score_inner_steps(s, pol, split, self.sdir(s) / "left-out" / "bank", leverage=True)
        atomic_write_json(self.sdir(s) / "left-out" / "scores.json", record)

    def fit(self, s: int, pol: PolicyAtInit) -> None:
        """Fit before generalise (issue 19): the same scores on the meta-train domains' own query pairs, for the
        warm start phi_0 (erm-rm: where meta-rm and erm-rm-extra begin) and for every reward model that refines it,
        at the end of training. Does meta-training lower its own objective more than the BT-only control?"""
        bilevel = [m for m in self.methods if registry.get(m).bilevel]
        split = self.split
        n = self.cfg.benchmark.fit_domains
        if n is not None:  # benchmark.fit_domains: the first n in name order, fixed before any run
            split = DomainSplit(split.task, {d: split.meta_train[d] for d in sorted(split.meta_train)[:n]},
                                split.held_out)
        record = self.score_inner_steps(s, pol, split, self.train_dir(s, bilevel[0]) / "bank", leverage=False)
        atomic_write_json(self.sdir(s) / "fit" / "scores.json", record)

    def score_inner_steps(self, s: int, pol: PolicyAtInit, split: DomainSplit, bank_dir: Path,
                          leverage: bool) -> dict:
        """Every non-per-domain reward model's inner step on each of `split`'s meta-train domains (selection.score_fold
        over select.eval_draws inner batches, all query pairs); with `leverage`, bilevel.step_leverage on the same
        draws for all RMs at once and the gold judge's scores of the samples."""
        from oodpl.core.bilevel import DomainTask, step_leverage
        from oodpl.train.metatrain import build_query_sets, draw_tasks, load_or_build_banks
        from oodpl.experiment.selection import score_fold

        cfg = self.config(s, "meta-rm")
        record = {"seed": s, "domains": sorted(split.meta_train), "inner_lr": cfg.meta.inner_lr,
                  "inner_steps": cfg.meta.inner_steps, "draws": cfg.select.eval_draws, "methods": {}}
        if not split.meta_train:
            return record
        policy = pol.get()
        banks = load_or_build_banks(policy, split, cfg, bank_dir, self.accelerator, progress=False)
        queries = build_query_sets(policy, split)
        pad = policy.tokenizer.pad_token_id
        rms = [m for m in self.methods if not registry.get(m).per_domain and self.rm_dir(s, m) is not None]
        draws = {d: [draw_tasks(1_000_003 + j, cfg, [d], {d: banks[d]}, {d: queries[d]})[0][1][0]
                     for j in range(cfg.select.eval_draws)] for d in record["domains"]}  # score_fold's draws
        rewards: dict[str, dict[str, list]] = {d: {} for d in record["domains"]}
        for m in rms:
            rm = self.rm(self.rm_dir(s, m))
            record["methods"][m] = {d: score_fold(policy, rm, d, banks[d], queries[d], cfg, pad)
                                    for d in record["domains"]}
            if leverage:
                with torch.no_grad():
                    for d, idx in draws.items():
                        rewards[d][m] = [rm.forward_encoded(banks[d].select(b, pad, rm).rm_encoding) for b in idx]
        if leverage and rms:
            from oodpl.evaluation.evaluate import references_for

            rm = self.rm(self.rm_dir(s, rms[-1]))
            record["leverage"] = {}
            for d, idx in draws.items():
                refs = references_for(self.split.task, split.meta_train[d].support_prompts)
                q = queries[d].select(list(range(len(queries[d]))), pad, rm)
                record["leverage"][d] = []
                for j, b in enumerate(idx):
                    samples = banks[d].select(b, pad, rm)
                    prompts = samples.repeated_prompts()
                    gold = self.judge.score(prompts, samples.responses,
                                            [refs.get(p) for p in prompts] if refs else None)
                    named = {m: rewards[d][m][j] for m in rms} | {"gold": torch.tensor(gold, dtype=torch.float64)}
                    record["leverage"][d].append(step_leverage(policy, DomainTask(d, [samples], q), named,
                                                               cfg.meta, cfg.rloo))
        return record

    def reward_scale(self, method: str, s: int, d: str, reward) -> float:
        """The meta-test's fixed scale: the reward's spread on the shared pi_ref samples of the adaptation prompts."""
        key = (f"{s}/{method}", d)
        if key not in self._scale_cache:
            ref, _ = load_samples(self.shared_path(d, "adapt_reference"))
            self._scale_cache[key] = reference_reward_scale(reward, ref)
        return self._scale_cache[key]

    def sample(self, s: int, pol: PolicyAtInit, method: str, d: str, di: int, beta: float | None) -> None:
        cfg = self.config(s, method)
        path = self.samples_path(s, method, d, beta)
        ho = self.split.held_out[d]
        eval_prompts = [p.prompt for p in ho.eval_prompts]
        info = {"method": method, "domain": d, "seed": s}
        seed_everything(s)
        policy = pol.get()
        output = registry.get(method).output
        if output == registry.REFERENCE:
            policy.reset_to_reference()
            policy_samples_to_file(path, policy, eval_prompts, cfg, eval_seed(s, di), info)
            return
        if output == registry.POLICY:
            from oodpl.train.dpo import load_trainable

            load_trainable(policy, RunLayout(self.train_dir(s, method)).policy_trainable)
            policy_samples_to_file(path, policy, eval_prompts, cfg, eval_seed(s, di), {**info, "dpo_beta":
                                                                                        cfg.rloo.beta})
            return
        gold = judge_fn(self.judge, self.refs_adapt[d])  # the meta-test's per-step gold reward (monitoring)
        reward = gold if output == registry.GOLD else reward_model_fn(self.rm(self.rm_dir(s, method, d)))
        scale = self.reward_scale(method, s, d, reward)
        meta_test_to_file(path, policy, [p.prompt for p in ho.adapt_prompts], eval_prompts, reward, cfg, beta,
                          s * 1000 + di, eval_seed(s, di), info, scale, progress=self.progress,
                          desc=f"meta-test {method} {d} beta={beta:g}",
                          log=self.logger.child(f"seed-{s}/meta-test/{method}/{d}/beta_{beta:g}").log,
                          gold_fn=gold)
        from oodpl.models.export import save_policy

        save_policy(policy, self.sdir(s) / "policies" / method / d / f"beta_{beta:g}",
                    base_dir=self.layout.base_model, metadata={**info, "beta_test": beta})

    def evaluate(self, s: int, pol: PolicyAtInit, method: str, d: str) -> None:
        """One (seed, domain, method) cell: metrics, n, per-unit values and the frontier (matched KL: collect); the
        record results.Cell reads."""
        cfg = self.config(s, method)
        ho = self.split.held_out[d]
        b0 = self.sample_betas(method)[0]
        rm_path = self.rm_dir(s, method, d)
        shared, shared_gold = load_shared_reference_samples(self.shared_path(d, "agreement"))
        frontier, units = [], {}
        main = dict.fromkeys(("gold_reward", "kl", "win_rate_vs_reference", "win_rate_vs_erm",
                              "own_sample_agreement"))
        n_samples = n_prompts = 0
        tested = self.meta_tested(s)
        if tested:
            ref_gold = self.gold(self.samples_path(s, "reference", d, None), d)
            erm_gold = (self.gold(self.samples_path(s, registry.ERM, d, self.betas[0]), d)
                        if registry.ERM in self.methods else None)
        for b in self.sample_betas(method) if tested else []:
            path = self.samples_path(s, method, d, b)
            samples, record = load_samples(path)
            g = self.gold(path, d)
            own = rm_sample_scores(self.rm(rm_path), samples) if (rm_path is not None and b == b0) else None
            m = sample_metrics(samples, g, ref_gold, erm_gold if b == b0 else None, own)
            frontier.append({"beta": b, "gold_reward": m["gold_reward"], "kl": m["kl"],
                             "gold_reward_ci": m["gold_reward_ci"]})
            if b == b0:
                main = m
                units["gold_reward"] = {"values": g, "clusters": prompt_clusters(samples.prompts)}
                n_samples, n_prompts = len(g), len(set(samples.prompts))
        pl = agr = spread = None
        if rm_path is not None:
            rm = self.rm(rm_path)
            spread = self.reward_scale(method, s, d, reward_model_fn(rm))  # diagnostics: s on pi_ref samples
            pl = rm_pl(rm, ho.eval_pairs)
            agr = agreement(rm_sample_scores(rm, shared), shared_gold, shared.prompts)
        elif registry.get(method).output == registry.POLICY:
            from oodpl.train.dpo import implicit_reward_on_samples, load_trainable

            policy = pol.get()
            load_trainable(policy, RunLayout(self.train_dir(s, method)).policy_trainable)
            pl = dpo_pl(policy, ho.eval_pairs, cfg.rloo.beta)
            agr = agreement(implicit_reward_on_samples(policy, shared, cfg.rloo.beta), shared_gold, shared.prompts)
        for key, part in (("pl_accuracy", pl), ("rm_gold_agreement", agr)):
            main[key] = None if part is None else part["value"]
            if part is not None:
                units[key] = part["units"]
        metrics = {k: main.get(k) for k in ("pl_accuracy", "rm_gold_agreement", "gold_reward", "kl",
                                            "win_rate_vs_reference", "win_rate_vs_erm", "own_sample_agreement")}
        n = {"eval_pairs": pl["n"] if pl else 0, "agreement_pairs": agr["n"] if agr else 0,
             "eval_prompts": n_prompts, "samples": n_samples}
        atomic_write_json(self.eval_path(s, method, d),
                          {"seed": s, "domain": d, "method": method, "beta": b0, "metrics": metrics, "n": n,
                           "units": units, "frontier": frontier, "reward_spread_ref": spread})

    # --------------------------------------------------------------------------------------------------- run
    def run(self) -> Results:
        from oodpl.evaluation.judges import judge_from_config

        t_start = time.time()
        with open_run(self.dir, "benchmark", self.cfg.fingerprint(), self.cfg) as run:
            self.split = load_or_build_split(run.layout.split, self.cfg.data)
            if not self.split.held_out:
                raise UserError("the split has no held-out domains; set data.held_out_domains")
            if "oracle-rm" in self.methods:
                require_oracle_pairs(self.split)
            self.judge = judge_from_config(self.cfg, self.split.task)
            run.record(self.split)
            run.commit()
            self.logger = MetricsLogger(self.dir, self.cfg.report_to, enabled=self.accelerator.is_main_process,
                                        config=self.cfg.to_dict(),
                                        tracking=self.cfg.tracking, stage="benchmark")
            self.refs = {d: references_for(self.split.task, h.eval_prompts) for d, h in self.split.held_out.items()}
            self.refs_adapt = {d: references_for(self.split.task, h.adapt_prompts)
                               for d, h in self.split.held_out.items()}
            self.selected = {}
            units = self.plan()
            done = [self.marker(s, u).exists() for s, u, _ in units]
            bar = tqdm(total=len(units), initial=sum(done), desc="benchmark", disable=not self.progress,
                       unit="unit", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
            for (s, name, fn), finished in zip(units, done):
                if name != "select":
                    self.selected = {m: v["best"] for m, v in self.load_selection().get("methods", {}).items()}
                if finished:
                    continue
                bar.set_postfix_str(f"seed {s}: {name}")
                t0 = time.time()
                fn()
                atomic_write_json(self.marker(s, name), {"unit": name, "seed": s, "seconds": time.time() - t0})
                bar.update(1)
            bar.close()
            self.logger.close()
            results = self.collect(units, wall=time.time() - t_start)
            from oodpl.experiment.report import write_results

            write_results(self.layout, results)
            return results

    def report_finished_seeds(self) -> Results:
        """Run nothing: results, report and plots of the seeds whose every unit has finished, of a run in progress or
        stopped (the same config), written to DIR/finished/. The run directory itself is only read."""
        if not self.layout.marker.exists() or not self.layout.split.exists():
            raise UserError(f"{self.dir} holds no benchmark run to report on; run `oodpl benchmark` first")
        marker = json.loads(self.layout.marker.read_text())
        if marker.get("fingerprint") != json.loads(json.dumps(self.cfg.fingerprint(), default=str)):
            raise UserError(f"{self.dir} holds a benchmark run of a different config; pass the config it was run with")
        self.split = DomainSplit.load(self.layout.split)
        self.selected = {m: v["best"] for m, v in self.load_selection().get("methods", {}).items()}
        units = self.plan()
        done = [s for s in self.seeds if all(self.marker(u_s, u).exists() for u_s, u, _ in units if u_s == s)]
        if not done:
            raise UserError(f"{self.dir}: no seed has finished all of its units yet; try again later")
        units = [u for u in units if u[0] in done]
        self.seeds = done
        results = self.collect(units, wall=sum(json.loads(self.marker(s, u).read_text())["seconds"]
                                               for s, u, _ in units))
        results.provenance["wall_seconds"] = None  # the run's wall time is unknown here: see timings
        results.provenance["note"] = (f"seeds {done} of {self.cfg.benchmark.seeds}: every unit of these seeds "
                                         "had finished; the others are left out")
        from oodpl.experiment.report import write_results

        write_results(self.layout.finished, results)
        return results

    # ----------------------------------------------------------------------------------------------- collect
    def collect(self, units, wall: float) -> Results:
        """Every seed's cells (eval records with the matched KL of their (seed, domain)) and the sections beside
        them, as the results.json schema (results.py)."""
        domains = sorted(self.split.held_out)
        cells = []
        for s in self.seeds:
            for d in domains:
                paths = {m: self.eval_path(s, m, d) for m in self.methods}
                recs = {m: json.loads(path.read_text()) for m, path in paths.items()}
                # the frontiers of the competing reward models (not the upper bounds) define the matched KL; each
                # starts at pi_ref's point, where every meta-test starts
                competing = [m for m in recs if registry.get(m).output == registry.REWARD_MODEL
                             and not registry.get(m).target_labels]
                optimised = {m: rec["frontier"] for m, rec in recs.items() if registry.get(m).optimised}
                ref = next((m for m in recs if registry.get(m).output == registry.REFERENCE), None)
                origin = recs[ref]["frontier"] if ref is not None else None
                target, at = gold_at_matched_kl(optimised, competing, origin)
                for m, rec in recs.items():
                    rec["metrics"]["gold_at_matched_kl"] = at.get(m)
                    rec["matched_kl"] = target
                    cells.append(Cell.from_json(rec, str(paths[m])))
        return Results(
            config=self.cfg.to_dict(),
            seeds=self.seeds,
            methods=self.methods,
            method_notes=registry.method_notes(self.cfg, self.methods),
            baselines=[b for b in registry.BASELINES if b in self.methods],
            split=self.split.summary(),
            domains=domains,
            betas=self.betas,
            cells=cells,
            samples_table=self.samples_table(domains),
            diagnostics=self.diagnostics(domains),
            left_out=self.left_out_scores(),
            fit=self.fit_scores(),
            meta_curves=self.meta_curves(),
            selection=self.selection_summary(),
            timings=self.timings(units, wall),
            provenance=provenance(wall),
        )

    def samples_table(self, domains: list[str], rows: int = 4) -> dict:
        """First evaluation prompts of each domain, one sample each of reference / erm-rm / meta-rm (first seed)."""
        s = self.seeds[0]
        if not self.meta_tested(s):
            return {}
        shown = [m for m in ("reference", "erm-rm", "erm-rm-extra", "meta-rm") if m in self.methods + ["reference"]]
        out = {}
        for d in domains:
            by_method = {}
            for m in shown:
                b = self.sample_betas(m)[0]
                samples, _ = load_samples(self.samples_path(s, m, d, b))
                by_method[m] = samples
            first = by_method["reference"]
            idx = [i for i in range(0, len(first.prompts), max(1, first.prompts.count(first.prompts[0])))][:rows]
            out[d] = [{"prompt": first.prompts[i], **{m: by_method[m].responses[i] for m in shown}} for i in idx]
        return out

    def diagnostics(self, domains: list[str]) -> dict:
        """Why meta-rm wins or loses (method.md, Statistics and evidence): per seed and meta method, the gradient-term
        ratio, the reward spread on pi_ref samples of the held-out adaptation prompts before (phi_0 = erm-rm) and
        after meta-training, the inner step's length and KL, and the outer loss on the meta-batch's query pairs
        before and after the inner step."""
        out: dict = {}
        for s in self.seeds:
            for m in self.methods:
                start = registry.get(m).warm_start  # phi_0
                if start in self.methods and registry.get(m).output == registry.REWARD_MODEL:
                    # did training move the RM away from its warm start? (a method that ends at phi_0 is phi_0)
                    dist = warm_start_distance(self.rm_dir(s, start), self.rm_dir(s, m))
                    if dist is not None:
                        out.setdefault(f"seed-{s}", {}).setdefault(m, {})["distance_from_warm_start"] = dist
                if not registry.get(m).bilevel:
                    continue
                rows = _read_jsonl(RunLayout(self.sdir(s) / m).metrics)
                entry = {k: [r.get(k) for r in rows] for k in ("grad_ratio", "inner_step_length", "inner_kl",
                                                               "outer_loss_before", "outer_loss", "inner_reward_std")}
                entry = {k: v for k, v in entry.items() if any(x is not None for x in v)}  # logged by this version
                spread = {}
                for d in domains:
                    start = registry.get(m).warm_start  # phi_0
                    cell = {w: json.loads(self.eval_path(s, w, d).read_text())
                            for w in (start, m) if w in self.methods}
                    spread[d] = {"before": cell.get(start, {}).get("reward_spread_ref"),
                                 "after": cell[m].get("reward_spread_ref")}
                entry["reward_spread_ref"] = spread
                out.setdefault(f"seed-{s}", {}).setdefault(m, {}).update(entry)
        sel = self.load_selection()
        if sel:
            out["left_out_meta_train_domains"] = sel.get("lodo_outer_loss", {})
        return out

    def left_out_scores(self) -> list[dict]:
        """The left-out diagnostic of every seed that ran it (see `left_out`)."""
        paths = [self.sdir(s) / "left-out" / "scores.json" for s in self.seeds]
        return [json.loads(p.read_text()) for p in paths if p.exists()]

    def fit_scores(self) -> list[dict]:
        """The fit diagnostic of every seed that ran it (see `fit`)."""
        paths = [self.sdir(s) / "fit" / "scores.json" for s in self.seeds]
        return [json.loads(p.read_text()) for p in paths if p.exists()]

    def meta_curves(self) -> dict:
        out: dict = {}
        for s in self.seeds:
            for m in self.methods:
                if registry.get(m).has_outer_steps:
                    rows = _read_jsonl(RunLayout(self.sdir(s) / m).metrics)
                    keep = ("step", "outer_loss", "bt_loss", "query_accuracy", "grad_ratio", "inner_kl")
                    out.setdefault(f"seed-{s}", {})[m] = [{k: r[k] for k in keep if k in r} for r in rows]
        return out

    def timings(self, units, wall: float) -> dict:
        unit_times = {}
        for s, name, _ in units:
            mk = self.marker(s, name)
            if mk.exists():
                unit_times[f"seed-{s}/{name}"] = json.loads(mk.read_text())["seconds"]
        by_stage: dict[str, float] = {}
        by_method: dict[str, float] = {}
        for key, sec in unit_times.items():
            parts = key.split("/")
            by_stage[parts[1]] = by_stage.get(parts[1], 0.0) + sec
            method = parts[2] if len(parts) > 2 else parts[1]
            by_method[method] = by_method.get(method, 0.0) + sec
        return {"units": unit_times, "by_stage": by_stage, "by_method": by_method,
                "total_unit_seconds": sum(unit_times.values()), "wall_seconds_this_run": wall}


def warm_start_distance(start_dir: Path | None, trained_dir: Path | None) -> dict | None:
    """||phi - phi_0|| over the reward model's weights (every tensor of its safetensors file), and the same relative
    to ||phi_0||: how far training moved an RM from the checkpoint it was warm-started from. None when either
    checkpoint is missing."""
    from safetensors.torch import load_file

    files = [d / "model.safetensors" if d is not None else None for d in (start_dir, trained_dir)]
    if any(f is None or not f.is_file() for f in files):
        return None
    a, b = (load_file(str(f)) for f in files)
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    diff = math.sqrt(sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in shared))
    norm = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in shared))
    return {"l2": diff, "relative": diff / norm if norm else None, "tensors": len(shared)}


def _read_jsonl(path: Path) -> list[dict]:
    from oodpl.runtime.runlog import read_metrics

    return read_metrics(path)  # skips a torn last line


def run_benchmark(cfg: Config, output: str | Path) -> Results:
    return Benchmark(cfg, output).run()
