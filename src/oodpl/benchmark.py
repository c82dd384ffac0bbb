"""`oodpl benchmark`: every method x held-out domain x seed, then results.json, results.csv, report.md and plots.

Methods (cfg.benchmark.methods; docs/method.md, "Baselines"), all with the same policy and reward backbones, the same
meta-train pairs and the same meta-test optimiser (metatest.optimise_policy):

    reference    pi_ref itself (no preference learning)
    erm-rm       Bradley-Terry RM on the pooled meta-train query pairs, then meta-test
    dpo          DPO of the LoRA policy on the pooled meta-train query pairs; evaluated on held-out prompts directly
    oracle-rm    BT RM on the held-out domain's own oracle pairs (uses target labels: an upper bound), then meta-test;
                 one RM per held-out domain, capped at as many pairs as erm-rm gets
    gold-reward  meta-test optimising the gold judge itself (an upper bound for generation quality)
    meta-rm      this method: the bilevel meta-trained RM (metatrain.meta_train), then meta-test
    meta-rm-bt0  ablation: meta.lambda_bt = 0 (pure bilevel, no Bradley-Terry anchor)
    meta-rm-k3   ablation: meta.inner_steps = 3 with the truncated hypergradient

Seeds: cfg.benchmark.seeds; seed s sets cfg.seed = s (model initialisation, sampling, minibatches) while data.seed
stays fixed, so every seed sees the same domain split.

Layout of the output directory (each finished unit is written atomically and skipped on a rerun):

    DIR/oodpl_run.json                          run marker (a different config in DIR is refused)
    DIR/config.yaml, DIR/split.json
    DIR/seed-S/erm-rm/reward_model/             HF sequence-classification checkpoints
    DIR/seed-S/oracle-rm/<domain>/reward_model/
    DIR/seed-S/meta-rm/ (also meta-rm-bt0/, meta-rm-k3/)   meta_train run directories (reward_model/, metrics.jsonl)
    DIR/seed-S/dpo/policy_trainable.pt          the DPO-trained LoRA tensors
    DIR/seed-S/samples/<method>/<domain>/beta-<b>.json     meta-test history + evaluation samples
    DIR/seed-S/samples/{reference,dpo}/<domain>/policy.json
    DIR/seed-S/eval/<method>/<domain>.json      metrics of one (method, domain, seed)
    DIR/seed-S/units/<unit>.json                "done" markers with the unit's wall time
    DIR/select/                                 with benchmark.select: the `oodpl select` run (selection.json/.md)
    DIR/results.json, DIR/results.csv, DIR/report.md, DIR/plots/*.png

results.json schema (stable):

    {
      "config": {...the resolved Config...},
      "seeds": [0, ...],
      "split": {...DomainSplit.summary()...},
      "methods": {
        METHOD: {
          "domains": {
            DOMAIN: {
              "pl_accuracy": AGG, "gold_reward": AGG, "kl": AGG,
              "win_rate_vs_reference": AGG, "win_rate_vs_erm": AGG, "rm_gold_agreement": AGG,
              "gold_reward_ci": [ {"mean", "low", "high", "n"} per seed ]     # 95% interval over samples
            }
          },
          "mean_over_domains": {the six metric keys: AGG of the per-seed means over domains}
        }
      },
      "frontier": {METHOD: {DOMAIN: [{"beta", "gold_reward", "gold_reward_std", "kl", "kl_std"} per beta_test]}},
      "selection": null, or with benchmark.select {"criterion", "folds", "best": {meta.KEY: value}, "set_flags"}
                   (leave-one-domain-out within meta-train domains, selection.py; applied to the meta-rm methods),
      "timings": {"units": {UNIT: seconds}, "by_stage": {...}, "by_method": {...}, "wall_seconds_this_run": s}
    }

AGG = metrics.aggregate_seeds(...) = {"mean", "std", "n", "per_seed"}; a metric that does not apply to a method
(pl_accuracy and rm_gold_agreement of reference / gold-reward, rm_gold_agreement of dpo, win_rate_vs_erm without
erm-rm) has per_seed entries null and mean/std null. The per-domain metrics, win rates and the report's main table
use the first beta_test; the frontier (for methods that run the meta-test optimiser) uses every beta_test; reference
and dpo have one frontier point with beta null.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Config, RewardConfig, dump_config, with_overrides
from .data.split import DomainSplit, build_split
from .errors import UserError, atomic_write_json, atomic_write_text, prepare_run_dir
from .evaluate import (dpo_pl_accuracy, gold_scores, load_samples, references_for, rm_pl_accuracy, rm_sample_scores,
                       sample_metrics)
from .metatest import draw_eval_samples, judge_fn, optimise_policy, reward_model_fn
from .metrics import aggregate_seeds
from .report import METRICS, make_plots, render_report, write_csv
from .runlog import seed_everything

ALL_METHODS = ["reference", "erm-rm", "dpo", "oracle-rm", "gold-reward", "meta-rm", "meta-rm-bt0", "meta-rm-k3"]
META_METHODS = {"meta-rm", "meta-rm-bt0", "meta-rm-k3"}
RM_METHODS = {"erm-rm", "oracle-rm"} | META_METHODS
OPTIMISED = RM_METHODS | {"gold-reward"}  # methods that run the meta-test optimiser (one samples file per beta)

def _fmt_beta(b: float) -> str:
    return f"{b:g}"


def eval_seed(seed: int, domain_index: int) -> int:
    """Generator seed of the evaluation samples: shared by every method (common random numbers)."""
    return 1_000_003 * seed + 7_919 * domain_index + 17


def seed_config(cfg: Config, seed: int, method: str | None = None, selected: dict | None = None) -> Config:
    """The config of one seed (and one meta method: the leave-one-domain-out choice first, then the ablation)."""
    c = with_overrides(cfg, selected, where="select") if selected and method in META_METHODS else copy.deepcopy(cfg)
    c.seed = seed
    if method == "meta-rm-bt0":
        c.meta.lambda_bt = 0.0
    elif method == "meta-rm-k3":
        c.meta.inner_steps = 3
        c.meta.hypergrad = "truncated"
    return c


# ----------------------------------------------------------------------------------------------------------------------
# Units shared with `oodpl meta-test`


def meta_test_to_file(path: Path, policy, prompts: list[str], reward_fn, cfg: Config, beta: float, opt_seed: int,
                      sample_seed: int, info: dict, progress: bool = False, desc: str = "meta-test") -> dict:
    """optimise_policy from pi_ref, then draw_eval_samples; one JSON record written atomically."""
    t0 = time.time()
    out = optimise_policy(policy, prompts, reward_fn, cfg, beta, opt_seed, progress=progress, desc=desc)
    samples = draw_eval_samples(policy, prompts, cfg.eval.samples_per_prompt, sample_seed)
    record = {**info, "beta": beta, "m": cfg.eval.samples_per_prompt, "history": out["history"],
              "samples": samples.to_json(), "seconds": time.time() - t0}
    atomic_write_json(path, record)
    return record


def policy_samples_to_file(path: Path, policy, prompts: list[str], cfg: Config, sample_seed: int, info: dict) -> dict:
    t0 = time.time()
    samples = draw_eval_samples(policy, prompts, cfg.eval.samples_per_prompt, sample_seed)
    record = {**info, "beta": None, "m": cfg.eval.samples_per_prompt, "history": [], "samples": samples.to_json(),
              "seconds": time.time() - t0}
    atomic_write_json(path, record)
    return record


def load_rm(path: Path, cfg: Config):
    from .models import load_reward_model

    return load_reward_model(RewardConfig(name_or_path=str(path), max_length=cfg.reward.max_length,
                                          dtype=cfg.reward.dtype))


def meta_test_command(cfg: Config, reward_model: str, output: str | Path, domains: list[str] | None = None) -> dict:
    """`oodpl meta-test`: every held-out domain (or `domains`) x every beta_test with a frozen RM checkpoint."""
    from .models import load_policy

    out = Path(output)
    rm_path = Path(reward_model)
    if not rm_path.exists():
        raise UserError(f"--reward-model {rm_path} does not exist; pass a Hugging Face sequence-classification "
                        "checkpoint directory (e.g. RUN/reward_model)")
    from .distributed import make_accelerator

    # Under `accelerate launch` each process takes every world-th (domain, beta) unit; the main process writes the
    # shared files.
    accelerator = make_accelerator()
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if main:
        prepare_run_dir(out, "meta-test", {"config": cfg.fingerprint(), "reward_model": str(rm_path.resolve()),
                                           "domains": domains})
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        split = DomainSplit.load(out / "split.json") if (out / "split.json").exists() else build_split(cfg.data)
        split.save(out / "split.json")
    accelerator.wait_for_everyone()
    split = DomainSplit.load(out / "split.json")
    names = sorted(split.held_out)
    chosen = domains or names
    for d in chosen:
        if d not in split.held_out:
            raise UserError(f"--domains: {d!r} is not a held-out domain of this split; choose from {', '.join(names)}")
    seed_everything(cfg.seed)
    rm = load_rm(rm_path, cfg)
    policy = load_policy(cfg.policy, seed=cfg.seed)
    policy.model.to(accelerator.device)
    rm.model.to(accelerator.device)
    progress = not cfg.quiet and main
    units = [(d, b) for d in chosen for b in cfg.meta_test.beta_test]
    files = {}
    for d, beta in units:
        files.setdefault(d, {})[_fmt_beta(beta)] = str(out / d / f"beta-{_fmt_beta(beta)}.json")
    bar = tqdm(units[rank::world], desc="meta-test", disable=not progress, unit="run")
    for d, beta in bar:
        path = out / d / f"beta-{_fmt_beta(beta)}.json"
        if path.exists():
            continue
        di = names.index(d)
        prompts = [p.prompt for p in split.held_out[d].eval_prompts]
        meta_test_to_file(path, policy, prompts, reward_model_fn(rm), cfg, beta, cfg.seed * 1000 + di,
                          eval_seed(cfg.seed, di), {"method": "reward-model", "reward_model": str(rm_path),
                                                    "domain": d, "seed": cfg.seed},
                          progress=progress, desc=f"meta-test {d} beta={beta:g}")
    bar.close()
    accelerator.wait_for_everyone()
    index = {"reward_model": str(rm_path), "files": files}
    if main:
        atomic_write_json(out / "meta_test.json", index)
    return index


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark


class _SeedState:
    """Per seed: one policy (LoRA init of that seed) whose initial trainable tensors are restored before each use."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._policy = None
        self._init = None

    def policy(self):
        from .models import load_policy

        if self._policy is None:
            self._policy = load_policy(self.cfg.policy, seed=self.cfg.seed)
            self._init = {k: v.detach().clone() for k, v in self._policy.trainable_parameters().items()}
        with torch.no_grad():
            for k, p in self._policy.trainable_parameters().items():
                p.copy_(self._init[k])
        return self._policy


class Benchmark:
    def __init__(self, cfg: Config, output: str | Path):
        self.cfg = cfg
        self.dir = Path(output)
        self.progress = not cfg.quiet
        unknown = [m for m in cfg.benchmark.methods if m not in ALL_METHODS]
        if unknown:
            raise UserError(f"benchmark.methods: unknown method {unknown[0]!r}; choose from {', '.join(ALL_METHODS)}")
        if not cfg.benchmark.methods:
            raise UserError("benchmark.methods is empty; list at least one method")
        if not cfg.benchmark.seeds:
            raise UserError("benchmark.seeds is empty; list at least one seed")
        self.methods = list(dict.fromkeys(cfg.benchmark.methods))
        self.seeds = list(dict.fromkeys(cfg.benchmark.seeds))
        self.betas = list(cfg.meta_test.beta_test)
        self._gold_cache: dict[str, list[float]] = {}
        self._rm_cache: dict[str, object] = {}

    # --------------------------------------------------------------------------------------------------- helpers
    def sdir(self, seed: int) -> Path:
        return self.dir / f"seed-{seed}"

    def marker(self, seed: int, unit: str) -> Path:
        return self.sdir(seed) / "units" / f"{unit.replace('/', '__')}.json"

    def samples_path(self, seed: int, method: str, domain: str, beta: float | None) -> Path:
        name = "policy.json" if beta is None else f"beta-{_fmt_beta(beta)}.json"
        return self.sdir(seed) / "samples" / method / domain / name

    def sample_betas(self, method: str) -> list[float | None]:
        return self.betas if method in OPTIMISED else [None]

    def rm_dir(self, seed: int, method: str, domain: str) -> Path | None:
        if method == "erm-rm":
            return self.sdir(seed) / "erm-rm" / "reward_model"
        if method == "oracle-rm":
            return self.sdir(seed) / "oracle-rm" / domain / "reward_model"
        if method in META_METHODS:
            return self.sdir(seed) / method / "reward_model"
        return None

    def rm(self, path: Path):
        key = str(path)
        if key not in self._rm_cache:
            self._rm_cache.clear()  # one RM in memory at a time
            self._rm_cache[key] = load_rm(path, self.cfg)
        return self._rm_cache[key]

    def gold(self, path: Path, domain: str) -> list[float]:
        key = str(path)
        if key not in self._gold_cache:
            samples, _ = load_samples(path)
            self._gold_cache[key] = gold_scores(self.judge, samples, self.refs[domain])
        return self._gold_cache[key]

    # ------------------------------------------------------------------------------------------------------ plan
    def plan(self) -> list[tuple[int, str, callable]]:
        """(seed, unit name, run function) in execution order."""
        units = []
        split = self.split
        domains = sorted(split.held_out)
        if self.cfg.benchmark.select and META_METHODS & set(self.methods):
            units.append((self.seeds[0], "select", self.run_select))
        for s in self.seeds:
            st = _SeedState(seed_config(self.cfg, s))
            if "erm-rm" in self.methods:
                units.append((s, "train/erm-rm", lambda s=s: self.train_erm(s)))
            if "oracle-rm" in self.methods:
                for d in domains:
                    units.append((s, f"train/oracle-rm/{d}", lambda s=s, d=d: self.train_oracle(s, d)))
            for m in self.methods:
                if m in META_METHODS:
                    units.append((s, f"train/{m}", lambda s=s, m=m: self.train_meta(s, m)))
            if "dpo" in self.methods:
                units.append((s, "train/dpo", lambda s=s, st=st: self.train_dpo(s, st)))
            sample_methods = list(dict.fromkeys(["reference"] + (["erm-rm"] if "erm-rm" in self.methods else [])
                                                + self.methods))
            for m in sample_methods:
                for di, d in enumerate(domains):
                    for b in self.sample_betas(m):
                        tag = "policy" if b is None else f"beta-{_fmt_beta(b)}"
                        units.append((s, f"sample/{m}/{d}/{tag}",
                                      lambda s=s, m=m, d=d, di=di, b=b, st=st: self.sample(s, st, m, d, di, b)))
            for m in self.methods:
                for d in domains:
                    units.append((s, f"eval/{m}/{d}", lambda s=s, m=m, d=d, st=st: self.evaluate(s, st, m, d)))
        return units

    # ----------------------------------------------------------------------------------------------------- units
    def train_erm(self, s: int) -> None:
        self._train_rm(s, self.split.pooled_pairs(), self.sdir(s) / "erm-rm", "erm-rm")

    def train_oracle(self, s: int, d: str) -> None:
        pairs = self.split.held_out[d].oracle_pairs[: max(1, len(self.split.pooled_pairs()))]
        if len(pairs) < 2:
            raise UserError(f"held-out domain {d} has {len(pairs)} oracle pairs; oracle-rm needs at least 2")
        self._train_rm(s, pairs, self.sdir(s) / "oracle-rm" / d, f"oracle-rm {d}")

    def _train_rm(self, s: int, pairs, directory: Path, what: str) -> None:
        from .models import load_reward_model
        from .rm_train import train_reward_model

        cfg = seed_config(self.cfg, s)
        seed_everything(s)
        rm = load_reward_model(cfg.reward, seed=s)
        stats = train_reward_model(rm, pairs, cfg.train_rm, seed=s, progress=False)
        rm.save(directory / "reward_model")
        atomic_write_json(directory / "train.json", {"what": what, "pairs": len(pairs), **stats})

    def run_select(self) -> None:
        from .selection import select_hyperparameters

        select_hyperparameters(seed_config(self.cfg, self.seeds[0]), self.dir / "select")

    def selection(self) -> dict | None:
        path = self.dir / "select" / "selection.json"
        return json.loads(path.read_text()) if self.cfg.benchmark.select and path.exists() else None

    def train_meta(self, s: int, method: str) -> None:
        from .metatrain import meta_train

        sel = self.selection()
        cfg = seed_config(self.cfg, s, method, sel["best"] if sel else None)
        meta_train(cfg, self.sdir(s) / method, resume=True)

    def train_dpo(self, s: int, st: _SeedState) -> None:
        from .dpo import save_trainable, train_dpo

        cfg = st.cfg
        seed_everything(s)
        policy = st.policy()
        stats = train_dpo(policy, self.split.pooled_pairs(), cfg.rloo.beta, cfg.benchmark.dpo_epochs,
                          cfg.benchmark.dpo_lr, cfg.train_rm.batch_size, seed=s, progress=self.progress)
        save_trainable(policy, self.sdir(s) / "dpo" / "policy_trainable.pt")
        atomic_write_json(self.sdir(s) / "dpo" / "train.json", {**stats, "beta": cfg.rloo.beta,
                                                                "pairs": len(self.split.pooled_pairs())})

    def sample(self, s: int, st: _SeedState, method: str, d: str, di: int, beta: float | None) -> None:
        cfg = st.cfg
        path = self.samples_path(s, method, d, beta)
        prompts = [p.prompt for p in self.split.held_out[d].eval_prompts]
        info = {"method": method, "domain": d, "seed": s}
        seed_everything(s)
        policy = st.policy()
        if method == "reference":
            policy.reset_to_reference()
            policy_samples_to_file(path, policy, prompts, cfg, eval_seed(s, di), info)
            return
        if method == "dpo":
            from .dpo import load_trainable

            load_trainable(policy, self.sdir(s) / "dpo" / "policy_trainable.pt")
            policy_samples_to_file(path, policy, prompts, cfg, eval_seed(s, di), {**info, "dpo_beta": cfg.rloo.beta})
            return
        if method == "gold-reward":
            reward = judge_fn(self.judge, self.refs[d])
        else:
            reward = reward_model_fn(self.rm(self.rm_dir(s, method, d)))
        meta_test_to_file(path, policy, prompts, reward, cfg, beta, s * 1000 + di, eval_seed(s, di), info,
                          progress=self.progress, desc=f"meta-test {method} {d} beta={beta:g}")

    def evaluate(self, s: int, st: _SeedState, method: str, d: str) -> None:
        cfg = st.cfg
        ho = self.split.held_out[d]
        b0 = self.sample_betas(method)[0]
        ref_gold = self.gold(self.samples_path(s, "reference", d, None), d)
        erm_gold = (self.gold(self.samples_path(s, "erm-rm", d, self.betas[0]), d)
                    if "erm-rm" in self.methods else None)
        rm_path = self.rm_dir(s, method, d)
        frontier = []
        main = None
        for b in self.sample_betas(method):
            path = self.samples_path(s, method, d, b)
            samples, record = load_samples(path)
            g = self.gold(path, d)
            rm_scores = rm_sample_scores(self.rm(rm_path), samples) if (rm_path is not None and b == b0) else None
            m = sample_metrics(samples, g, ref_gold, erm_gold if b == b0 else None, rm_scores)
            frontier.append({"beta": b, "gold_reward": m["gold_reward"], "kl": m["kl"],
                             "gold_reward_ci": m["gold_reward_ci"]})
            if b == b0:
                main = m
        if rm_path is not None:
            main["pl_accuracy"] = rm_pl_accuracy(self.rm(rm_path), ho.eval_pairs)
        elif method == "dpo":
            from .dpo import load_trainable

            policy = st.policy()
            load_trainable(policy, self.sdir(s) / "dpo" / "policy_trainable.pt")
            main["pl_accuracy"] = dpo_pl_accuracy(policy, ho.eval_pairs, cfg.rloo.beta)
        else:
            main["pl_accuracy"] = None
        atomic_write_json(self.sdir(s) / "eval" / method / f"{d}.json",
                          {"method": method, "domain": d, "seed": s, "beta": b0,
                           "metrics": {k: main[k] for k in METRICS}, "gold_reward_ci": main["gold_reward_ci"],
                           "frontier": frontier})

    # ------------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from .judges import make_judge

        t_start = time.time()
        prepare_run_dir(self.dir, "benchmark", self.cfg.fingerprint())
        atomic_write_text(self.dir / "config.yaml", dump_config(self.cfg))
        split_path = self.dir / "split.json"
        if split_path.exists():
            self.split = DomainSplit.load(split_path)
        else:
            self.split = build_split(self.cfg.data)
            self.split.save(split_path)
        if not self.split.held_out:
            raise UserError("the split has no held-out domains; set data.held_out_domains")
        self.judge = make_judge(self.cfg.eval.judge, self.split.task, self.cfg.eval.llm_url, self.cfg.eval.llm_model)
        self.refs = {d: references_for(self.split.task, h.eval_prompts) for d, h in self.split.held_out.items()}
        units = self.plan()
        done = [self.marker(s, u).exists() for s, u, _ in units]
        bar = tqdm(total=len(units), initial=sum(done), desc="benchmark", disable=not self.progress, unit="unit",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        for (s, name, fn), finished in zip(units, done):
            if finished:
                continue
            bar.set_postfix_str(f"seed {s}: {name}")
            t0 = time.time()
            fn()
            atomic_write_json(self.marker(s, name), {"unit": name, "seed": s, "seconds": time.time() - t0})
            bar.update(1)
        bar.close()
        results = self.collect(units, wall=time.time() - t_start)
        atomic_write_json(self.dir / "results.json", results)
        write_csv(self.dir / "results.csv", results)
        plots = make_plots(self.dir, results, self.seeds[0])
        atomic_write_text(self.dir / "report.md", render_report(results, plots, self.dir))
        return results

    # --------------------------------------------------------------------------------------------------- collect
    def collect(self, units, wall: float) -> dict:
        domains = sorted(self.split.held_out)
        per = {m: {d: {k: [] for k in METRICS + ["gold_reward_ci"]} for d in domains} for m in self.methods}
        front: dict = {m: {d: {} for d in domains} for m in self.methods}
        for s in self.seeds:
            for m in self.methods:
                for d in domains:
                    rec = json.loads((self.sdir(s) / "eval" / m / f"{d}.json").read_text())
                    for k in METRICS:
                        per[m][d][k].append(rec["metrics"][k])
                    per[m][d]["gold_reward_ci"].append(rec["gold_reward_ci"])
                    for pt in rec["frontier"]:
                        key = "null" if pt["beta"] is None else _fmt_beta(pt["beta"])
                        front[m][d].setdefault(key, {"beta": pt["beta"], "gold_reward": [], "kl": []})
                        front[m][d][key]["gold_reward"].append(pt["gold_reward"])
                        front[m][d][key]["kl"].append(pt["kl"])
        methods = {}
        for m in self.methods:
            dom = {}
            for d in domains:
                dom[d] = {k: aggregate_seeds(per[m][d][k]) for k in METRICS}
                dom[d]["gold_reward_ci"] = per[m][d]["gold_reward_ci"]
            mean_over = {}
            for k in METRICS:
                seed_means = []
                for i in range(len(self.seeds)):
                    vals = [per[m][d][k][i] for d in domains if per[m][d][k][i] is not None]
                    seed_means.append(sum(vals) / len(vals) if vals else None)
                mean_over[k] = aggregate_seeds(seed_means)
            methods[m] = {"domains": dom, "mean_over_domains": mean_over}
        frontier = {}
        for m in self.methods:
            frontier[m] = {}
            for d in domains:
                pts = []
                for key, v in front[m][d].items():
                    g, kl = aggregate_seeds(v["gold_reward"]), aggregate_seeds(v["kl"])
                    pts.append({"beta": v["beta"], "gold_reward": g["mean"], "gold_reward_std": g["std"],
                                "kl": kl["mean"], "kl_std": kl["std"]})
                frontier[m][d] = pts
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
            method = parts[2] if len(parts) > 2 else parts[1]  # "seed-S/select" has no method part
            by_method[method] = by_method.get(method, 0.0) + sec
        sel = self.selection()
        return {
            "config": self.cfg.to_dict(),
            "selection": None if sel is None else {k: sel[k] for k in ("criterion", "folds", "best", "set_flags")},
            "seeds": self.seeds,
            "split": self.split.summary(),
            "methods": methods,
            "frontier": frontier,
            "timings": {"units": unit_times, "by_stage": by_stage, "by_method": by_method,
                        "total_unit_seconds": sum(unit_times.values()), "wall_seconds_this_run": wall},
        }


def run_benchmark(cfg: Config, output: str | Path) -> dict:
    return Benchmark(cfg, output).run()
