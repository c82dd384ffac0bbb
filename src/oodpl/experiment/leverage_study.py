"""`oodpl diagnose leverage`: the leverage study of method.md ("Leverage of the meta-objective").

Before asking whether meta-training generalises, measure whether it can move its own objective at all. For a
config (the baseline setting) and a list of variations of it, on meta-train domains only (their query pairs are
training data; no held-out domain is touched), every (domain, draw) cell takes ONE inner step at theta_0 on a draw of
the domain's inner prompts, scores it on the first `pairs` of the domain's query pairs (16 by default, the same in
every row: a full-depth row costs a forward and backward pass of the whole network over them) and measures
(bilevel.step_leverage):

    headroom H            the largest first-order drop of the outer loss any reward can give (nats)
    oracle real drop, KL  the real inner step under the oracle reward -s~ (the step standardises it) and its KL
    erm-rm alignment      cos(r^, -s~) of an ordinary BT reward model trained on the OTHER study domains' pairs
                          (leave-one-domain-out: the RM has not seen the domain it is scored on), with its real drop
    gold alignment        the gold judge's scores of the same samples against -s~
    floor                 a random reward's alignment spread, 1/sqrt(B(n-1))

Cells are averaged over draws within a domain; intervals are 95% t-intervals over domains. pi_ref samples do not
depend on the adapters, so one bank per (domain, prompt set, response length) serves every depth, step size and beta
(samples per prompt are the bank's first n). Results go to OUTPUT/leverage.json and OUTPUT/leverage.md; every
variation is a unit (OUTPUT/rows/<name>.json) that a rerun skips.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oodpl.config import Config, with_overrides
from oodpl.errors import UserError, atomic_write_json, atomic_write_text
from oodpl.runtime.rundir import RunLayout, open_run
from oodpl.evaluation.stats import t_interval
from oodpl.data.split import load_or_build_split

if TYPE_CHECKING:
    from oodpl.data.split import DomainSplit


@dataclass(frozen=True)
class Variation:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    inner_prompts: str = "support"  # "support" (the domain's support prompts) or "query" (its query pairs' prompts)
    warm_steps: int = 0  # > 0: measured at a warm theta_d, after this many inner steps under erm-rm (fresh samples)
    note: str = ""


def variations(cfg: Config) -> list[Variation]:
    """The study's rows: the baseline, then one setting changed at a time (method.md, issue 19 item 2)."""
    layers = cfg.policy.trainable_layers
    rows = [Variation("baseline", note="the config as given")]
    for L in (4, 8, 16):
        if L != layers:
            rows.append(Variation(f"top {L} layers", {"policy.trainable_layers": L}))
    if layers:
        rows.append(Variation("all layers", {"policy.trainable_layers": None}))
    rows.append(Variation("all layers, inner_lr/10", {"policy.trainable_layers": None,
                                                      "meta.inner_lr": cfg.meta.inner_lr / 10}))
    rows.append(Variation("inner_lr x3", {"meta.inner_lr": cfg.meta.inner_lr * 3}))
    rows.append(Variation("inner_lr /3", {"meta.inner_lr": cfg.meta.inner_lr / 3}))
    rows.append(Variation("beta x5", {"rloo.beta": cfg.rloo.beta * 5}))
    rows.append(Variation("samples per prompt x2", {"rloo.num_samples": cfg.rloo.num_samples * 2}))
    rows.append(Variation("prompts per step x2", {"rloo.batch_prompts": cfg.rloo.batch_prompts * 2}))
    rows.append(Variation("new tokens x2", {"policy.max_new_tokens": cfg.policy.max_new_tokens * 2}))
    rows.append(Variation("human cap from data", {"policy.max_response_tokens": "data"},
                          note="the cap = the longest human response of the study domains' pairs"))
    rows.append(Variation("inner prompts = query prompts", inner_prompts="query",
                          note="the inner step samples on the query pairs' own prompts"))
    # combinations a preset could use: beta multiplies H at the same step (it scales the outer loss), deeper adapters
    # raise H and the gold alignment but need a smaller step to keep the inner KL moderate
    rows.append(Variation("beta x5, top 8 layers, inner_lr/3", {"rloo.beta": cfg.rloo.beta * 5,
                                                                "policy.trainable_layers": 8,
                                                                "meta.inner_lr": cfg.meta.inner_lr / 3}))
    rows.append(Variation("beta x5, all layers, inner_lr/100", {"rloo.beta": cfg.rloo.beta * 5,
                                                                "policy.trainable_layers": None,
                                                                "meta.inner_lr": cfg.meta.inner_lr / 100}))
    rows.append(Variation("samples+demos", {"meta.inner_candidates": "samples+demos"},
                          note="the drawn support prompts' human continuations join the step as demonstrations "
                               "(method.md, \"Demonstrations in the inner step\"; meta.demo_weight "
                               f"{cfg.meta.demo_weight:g})"))
    rows.append(Variation("warm theta_d", {"meta.inner_start": "warm"}, warm_steps=3,
                          note="the step is taken at theta_d reached by 3 earlier inner steps under erm-rm, on fresh "
                               "samples of pi_theta_d (method.md, \"Warm-started inner policy\")"))
    return rows


def _response_lengths(policy, pairs) -> list[int]:
    from oodpl.models.sampling import encode_responses

    prompts = [p.prompt for p in pairs] * 2
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return [len(r) for r in encode_responses(policy.tokenizer, prompts, texts, 10**9, policy.config.chat_template)]


def study_domains(split: "DomainSplit", domains: list[str] | None, command: str) -> list[str]:
    """The meta-train domains a study runs on: `domains`, or the split's first 3 (at least 2 meta-train domains are
    needed: each domain's erm-rm is trained on the others)."""
    names = sorted(split.meta_train)
    if len(names) < 2:
        raise UserError(f"{command} needs at least 2 meta-train domains (leave-one-domain-out erm-rm); the split has "
                        f"{len(names)}")
    chosen = domains or names[: min(3, len(names))]
    unknown = [d for d in chosen if d not in names]
    if unknown:
        raise UserError(f"{command} --domains: {unknown[0]!r} is not a meta-train domain of the split; choose from "
                        f"{', '.join(names)}")
    return chosen


def leave_one_out_rm(cfg: Config, split: "DomainSplit", d: str, out: Path):
    """erm-rm of meta-train domain d: BT on the OTHER meta-train domains' query pairs, so the RM has not seen the
    domain it is used on (as on a held-out domain); saved once under OUT/erm-rm/without-<d> and loaded from there."""
    from oodpl.models.reward import load_reward_checkpoint
    from oodpl.train.rm_train import fit_reward_model

    path = out / "erm-rm" / f"without-{d}"
    if not (path / "config.json").exists():
        pairs = [p for n in sorted(split.meta_train) if n != d for p in split.meta_train[n].query_pairs]
        rm, _ = fit_reward_model(cfg, pairs, seed=cfg.seed)
        rm.save(path)
    return load_reward_checkpoint(path, cfg.reward)


class _Study:
    """Caches shared across variations: policies by depth, banks by (domain, prompts, length), RMs by domain."""

    def __init__(self, cfg: Config, out: Path, split: "DomainSplit", domains: list[str], draws: int, pairs: int):
        from oodpl.evaluation.judges import judge_from_config

        self.cfg, self.out, self.split, self.draws, self.pairs = cfg, out, split, draws, pairs
        self.domains = study_domains(split, domains, "diagnose leverage")
        self.judge = judge_from_config(cfg, self.split.task)
        self._policies: dict = {}
        self._banks: dict = {}
        self._rms: dict = {}
        self._queries: dict = {}
        self._demos: dict = {}

    def policy(self, c: Config):
        from oodpl.models.policy import load_policy
        from oodpl.models.precision import place

        # the module depends on where the adapters sit; the rest of c.policy (lengths, caps) is read from
        # policy.config by the encoders, so it is set on every use
        key = (c.policy.trainable_layers, c.policy.lora_r, c.policy.lora_alpha, c.policy.dtype)
        if key not in self._policies:
            self._policies.clear()  # one policy in memory at a time
            self._queries.clear()
            self._demos.clear()
            self._policies[key] = place(load_policy(c.policy, seed=c.seed), None)
        policy = self._policies[key]
        # keep the template setting load_policy resolved ("auto" -> a bool): the encoders read a bool
        policy.config = replace(c.policy, chat_template=policy.config.chat_template)
        return policy

    def rm(self, d: str):
        if d not in self._rms:
            self._rms[d] = leave_one_out_rm(self.cfg, self.split, d, self.out)
        return self._rms[d]

    def bank(self, c: Config, policy, d: str, inner_prompts: str, n: int):
        from oodpl.models.sampling import SampleBank, build_bank

        dom = self.split.meta_train[d]
        if inner_prompts == "query":  # as many prompts as the support set: the same bank size
            prompts = list(dict.fromkeys(p.prompt for p in dom.query_pairs))[: len(dom.support_prompts)]
        else:
            prompts = [p.prompt for p in dom.support_prompts]
        key = (d, inner_prompts, c.policy.max_new_tokens)
        n_max = max(n, self.cfg.rloo.num_samples * 2)
        path = RunLayout(self.out).bank / f"{d}-{inner_prompts}-{c.policy.max_new_tokens}.pt"
        if key not in self._banks:
            if path.exists():
                bank = SampleBank.load(path)
            else:
                bank = build_bank(policy, prompts, n_max, seed=c.seed * 1000 + sorted(self.split.meta_train).index(d))
                path.parent.mkdir(parents=True, exist_ok=True)
                bank.save(path)
            self._banks[key] = bank
        full = self._banks[key].for_policy(policy)
        if n == full.n:
            return full
        # the first n of each prompt's samples: i.i.d. draws from pi_ref like the whole set
        sub = SampleBank(full.prompts, full.prompt_ids, [r[:n] for r in full.response_ids],
                         [r[:n] for r in full.responses], full.ref_logp[:, :n], n, dict(full.meta))
        if full.trunk is not None:
            sub.trunk = [full.trunk[i * full.n + j] for i in range(len(full.prompts)) for j in range(n)]
            sub.trunk_layer = full.trunk_layer
        return sub

    def queries(self, c: Config, policy, d: str):
        from oodpl.core.bilevel import PreferenceSet

        key = (d, c.policy.trainable_layers, c.policy.response_cap())
        if key not in self._queries:
            pairs = self.split.meta_train[d].query_pairs
            self._queries[key] = PreferenceSet.build(policy, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                                     [p.rejected for p in pairs])
        return self._queries[key]

    def demos(self, c: Config, policy, d: str, bank):
        """The domain's demonstrations (support prompts' references, never a query response), in bank order."""
        from oodpl.core.bilevel import DemonstrationSet

        key = (d, c.policy.trainable_layers, c.policy.response_cap())
        if key not in self._demos:
            dom = self.split.meta_train[d]
            refs = {p.prompt: p.reference for p in dom.support_prompts}
            outer = [t for pair in dom.query_pairs for t in (pair.chosen, pair.rejected)]
            self._demos[key] = DemonstrationSet.build(policy, bank.prompts, [refs.get(p) for p in bank.prompts], outer)
        return self._demos[key]

    def warm_theta(self, c: Config, policy, task_of, rm, di: int, bank, rng, pad: int, steps: int):
        """theta_d after `steps` inner steps under erm-rm from theta_init, each on a fresh draw of pi_theta samples."""
        import copy

        from oodpl.core.bilevel import inner_loop
        from oodpl.train.metatrain import warm_sample_seed
        from oodpl.models.sampling import draw_samples

        one = copy.copy(c.meta)
        one.inner_steps, one.inner_candidates = 1, "samples"
        theta = {k: v.detach() for k, v in policy.theta_init().items()}
        B = min(c.rloo.batch_prompts, len(bank.prompts))
        for w in range(steps):
            idx = sorted(rng.choice(len(bank.prompts), size=B, replace=False).tolist())
            samples = draw_samples(policy, theta, [bank.prompts[i] for i in idx], [bank.prompt_ids[i] for i in idx],
                                   c.rloo.num_samples, warm_sample_seed(c.seed, 10_000 + w, di, 0), rm)
            with torch.no_grad():
                r = rm.forward_encoded(samples.rm_encoding)
            thetas, _ = inner_loop(policy, task_of([samples], None, theta), [r], one, c.rloo)
            theta = {k: v.detach() for k, v in thetas[-1].items()}
        return theta

    def human_cap(self) -> int:
        policy = self.policy(self.cfg)
        pairs = [p for d in self.domains for p in self.split.meta_train[d].query_pairs]
        return max(_response_lengths(policy, pairs))

    def run(self, v: Variation) -> dict:
        from oodpl.core.bilevel import DomainTask, step_leverage
        from oodpl.evaluation.evaluate import references_for

        overrides = dict(v.overrides)
        if overrides.get("policy.max_response_tokens") == "data":
            overrides["policy.max_response_tokens"] = self.human_cap()
        c = with_overrides(self.cfg, overrides, where=f"leverage study ({v.name})")
        t0 = time.time()
        policy = self.policy(c)
        pad = policy.tokenizer.pad_token_id
        cells: dict[str, list[dict]] = {}
        cut = total = 0
        for di, d in enumerate(self.domains):
            rm = self.rm(d)
            bank = self.bank(c, policy, d, v.inner_prompts, c.rloo.num_samples)
            query = self.queries(c, policy, d)
            pairs = self.split.meta_train[d].query_pairs
            lengths = _response_lengths(policy, pairs)
            cut += sum(L > c.policy.response_cap() for L in lengths)
            total += len(lengths)
            refs = references_for(self.split.task, self.split.meta_train[d].support_prompts)
            q = query.select(list(range(min(len(query), self.pairs))), pad, rm)
            rng = np.random.default_rng([c.seed, 31, di])
            B = min(c.rloo.batch_prompts, len(bank.prompts))
            demo_set = self.demos(c, policy, d, bank) if c.meta.inner_candidates == "samples+demos" else None

            def task_of(inner, demos, theta):
                return DomainTask(d, inner, q, demos, theta)

            for j in range(self.draws):
                theta = (self.warm_theta(c, policy, task_of, rm, di, bank, rng, pad, v.warm_steps)
                         if v.warm_steps else None)
                idx = sorted(rng.choice(len(bank.prompts), size=B, replace=False).tolist())
                if theta is None:
                    samples = bank.select(idx, pad, rm)
                else:  # fresh samples of pi_theta_d, as the warm-started inner step draws them
                    from oodpl.train.metatrain import warm_sample_seed
                    from oodpl.models.sampling import draw_samples

                    samples = draw_samples(policy, theta, [bank.prompts[i] for i in idx],
                                           [bank.prompt_ids[i] for i in idx], c.rloo.num_samples,
                                           warm_sample_seed(c.seed, 20_000 + j, di, 0), rm)
                demos = None if demo_set is None else demo_set.select(idx, pad, rm)
                candidates = [samples] + ([demos] if demos is not None else [])
                with torch.no_grad():
                    r_rm = torch.cat([rm.forward_encoded(x.rm_encoding) for x in candidates])
                gold = []
                for x in candidates:
                    prompts = x.repeated_prompts()
                    gold += self.judge.score(prompts, x.responses, [refs.get(p) for p in prompts] if refs else None)
                task = task_of([samples], None if demos is None else [demos], theta)
                cells.setdefault(d, []).append(step_leverage(
                    policy, task, {"erm-rm": r_rm, "gold": torch.tensor(gold, dtype=torch.float64)}, c.meta, c.rloo))
        return {"variation": v.name, "overrides": overrides, "inner_prompts": v.inner_prompts, "note": v.note,
                "setting": {"trainable_layers": c.policy.trainable_layers, "inner_lr": c.meta.inner_lr,
                            "beta": c.rloo.beta, "num_samples": c.rloo.num_samples,
                            "batch_prompts": c.rloo.batch_prompts, "max_new_tokens": c.policy.max_new_tokens,
                            "response_cap": c.policy.response_cap(), "inner_candidates": c.meta.inner_candidates},
                "warm_steps": v.warm_steps,
                "human_responses_cut": cut, "human_responses": total, "draws": self.draws,
                "query_pairs": min(self.pairs, min(len(self.split.meta_train[d].query_pairs) for d in self.domains)),
                "cells": cells, "summary": summarise(cells), "seconds": time.time() - t0}


METRICS = [  # (key in the summary, path in a step_leverage record)
    ("headroom", ("headroom",)),
    ("oracle_real_drop", ("oracle", "real_drop")),
    ("oracle_kl", ("oracle", "kl_after")),
    ("oracle_kl_ref", ("oracle", "kl_ref_after")),
    ("erm_alignment", ("erm-rm", "alignment")),
    ("erm_real_drop", ("erm-rm", "real_drop")),
    ("gold_alignment", ("gold", "alignment")),
    ("floor", ("floor",)),
    ("outer_loss_before", ("outer_loss_before",)),
]


def _get(record: dict, path: tuple[str, ...]) -> float | None:
    for k in path:
        if k not in record:
            return None  # measured by a later version only
        record = record[k]
    return float(record)


def summarise(cells: dict[str, list[dict]]) -> dict[str, dict]:
    """Per metric: the mean over draws within each domain, then a 95% t-interval over domains; and the median over
    all cells (the KL estimates are heavy-tailed once a step leaves the samples' support)."""
    out = {}
    for key, path in METRICS:
        values = {d: [_get(r, path) for r in recs] for d, recs in cells.items()}
        if any(v is None for vs in values.values() for v in vs):
            out[key] = {**t_interval([]), "per_domain": {}, "median": None}
            continue
        per_domain = [float(np.mean(vs)) for vs in values.values()]
        out[key] = {**t_interval(per_domain), "per_domain": dict(zip(cells, per_domain)),
                    "median": float(np.median([v for vs in values.values() for v in vs]))}
    return out


def _median(m: dict, digits: int = 3) -> str:
    return "n/a" if m.get("median") is None else f"{m['median']:.{digits}f}"


def _fmt(ci: dict, digits: int = 4) -> str:
    if ci["mean"] is None:
        return "n/a"
    if ci["low"] is None:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def render(study: dict) -> str:
    rows = [{**r, "summary": summarise(r["cells"])} for r in study["rows"]]  # rows of earlier versions too
    base = rows[0]["setting"]
    lines = [
        "# Leverage of the meta-objective (meta-train domains only)", "",
        f"Generated by `{study['command']}` on {study['date']} ({study['machine']}; load average at the start "
        f"{study['load']}; {study['seconds'] / 60:.1f} min of computation over its rows).", "",
        f"Task `{study['task']}`, study domains {', '.join(study['domains'])} (meta-train domains: their query pairs "
        "are training data; no held-out domain was used). Each cell: one inner step at theta_0 on a draw of "
        f"{base['batch_prompts']} inner prompts x n pi_ref samples, scored on the first {study['pairs']} of the "
        "domain's query pairs (the same pairs in every row); "
        f"{study['draws']} draws per domain, averaged; entries are the mean and a 95% t-interval over the "
        f"{len(study['domains'])} domains. erm-rm is trained on the other study domains' pairs (leave-one-domain-out)."
        " Drops are in nats (positive = the step lowers the outer loss); log 2 = 0.6931 is the outer loss at pi_ref.",
        "",
        "| variation | setting | headroom H | oracle real drop | oracle inner KL (median) | oracle KL(ref, pi) (median) "
        "| erm-rm alignment | erm-rm real drop | gold alignment | floor | human responses cut | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, m = r["setting"], r["summary"]
        setting = (f"L={s['trainable_layers'] or 'all'}, alpha={s['inner_lr']:g}, beta={s['beta']:g}, "
                   f"n={s['num_samples']}, B={s['batch_prompts']}, T={s['max_new_tokens']}, cap={s['response_cap']}"
                   + (", inner=query prompts" if r["inner_prompts"] == "query" else "")
                   + (f", {s['inner_candidates']}" if s.get("inner_candidates", "samples") != "samples" else "")
                   + (f", warm after {r['warm_steps']} steps" if r.get("warm_steps") else ""))
        lines.append(f"| {r['variation']} | {setting} | {_fmt(m['headroom'])} | {_fmt(m['oracle_real_drop'])} | "
                     f"{_median(m['oracle_kl'])} | {_median(m['oracle_kl_ref'])} | "
                     f"{_fmt(m['erm_alignment'], 3)} | {_fmt(m['erm_real_drop'])} | "
                     f"{_fmt(m['gold_alignment'], 3)} | {m['floor']['mean']:.3f} | "
                     f"{r['human_responses_cut']}/{r['human_responses']} | {r['seconds']:.0f} |")
    lines += ["", "How to read it: H bounds what any reward can do per inner step; the oracle's real drop is what "
              "the real (finite) step achieves with the best direction, at the KL shown; an RM's alignment is the "
              "fraction of H it uses, to be compared with the floor (a random reward's spread). Gold alignment near 0 "
              "means the direction the outer loss asks for is not the one the gold judge prefers. A preset should "
              "run where H and the oracle's real drop are large against the effect it wants to detect, at a "
              "moderate inner KL.", ""]
    best = max((r for r in rows if r["summary"]["oracle_kl"].get("median") is not None
                and r["summary"]["oracle_kl"]["median"] <= 0.5), default=None,
               key=lambda r: r["summary"]["oracle_real_drop"]["mean"])
    if best is not None:
        lines.append(f"Largest oracle real drop at a median oracle inner KL of at most 0.5 nats: "
                     f"**{best['variation']}** ({_fmt(best['summary']['oracle_real_drop'])} nats).")
    lines.append("")
    lines.append("The inner KL is KL(pi_theta1 || pi_ref) estimated on the step's samples with weights pi_theta1 / "
                 "pi_ref (bilevel.adapted_kl); once a step makes a few samples far more likely the estimate explodes, "
                 "so the table shows medians over cells, and KL(pi_ref || pi_theta1) (bilevel.reference_kl, no such "
                 "weight) beside it where measured.")
    for r in rows:
        if r["note"]:
            lines.append(f"- {r['variation']}: {r['note']}.")
    return "\n".join(lines) + "\n"


def run_leverage_study(cfg: Config, output: str | Path, domains: list[str] | None = None, draws: int = 3,
                       only: list[str] | None = None, pairs: int = 16) -> dict:
    """The study for `cfg` (see the module docstring); returns the study dict also written to OUTPUT/leverage.json."""
    from oodpl.runtime.runlog import provenance

    out = Path(output)
    rows_wanted = variations(cfg)
    if only:
        names = {v.name for v in rows_wanted}
        bad = [o for o in only if o not in names]
        if bad:
            raise UserError(f"diagnose leverage --only: unknown variation {bad[0]!r}; choose from "
                            f"{', '.join(sorted(names))}")
        rows_wanted = [v for v in rows_wanted if v.name in only or v.name == "baseline"]
    t0 = time.time()
    prov = provenance(0.0)
    fingerprint = {"config": cfg.fingerprint(), "domains": domains, "draws": draws, "pairs": pairs}
    with open_run(out, "leverage", fingerprint, cfg) as run:
        split = load_or_build_split(run.layout.split, cfg.data)
        run.record(split)
        study = _Study(cfg, out, split, domains or [], draws, pairs)
        run.commit()
        rows = []
        for v in rows_wanted:
            path = out / "rows" / (v.name.replace(" ", "_").replace("/", "-").replace(",", "") + ".json")
            if not path.exists():
                if not cfg.quiet:
                    print(f"leverage: {v.name}", flush=True)
                atomic_write_json(path, study.run(v))
            rows.append(json.loads(path.read_text()))
        result = {"task": study.split.task, "domains": study.domains, "draws": draws, "pairs": pairs, "rows": rows,
                  "command": prov["command"], "date": prov["date"], "machine": prov["machine"], "load": prov["load"],
                  "seconds": sum(r["seconds"] for r in rows), "seconds_this_invocation": time.time() - t0}
        atomic_write_json(out / "leverage.json", result)
        atomic_write_text(out / "leverage.md", render(result))
    return result
