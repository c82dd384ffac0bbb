"""The schema of a benchmark's results.json (version 2): written by benchmark.py (`Benchmark.collect`), read by
report.py (results.csv, report.md, plots) and by anyone who loads a finished run.

`Results.to_json()` is the dict results.json holds, key for key in the order of the dataclass fields;
`Results.from_json(d)` reads one back. A file of another version is refused; the keys that later v2 writers added
(`Results`: method_notes, left_out, fit; `Cell`: reward_spread_ref) may be missing and read as empty. Every other
field is required, so a truncated or foreign file fails with a message naming the key rather than rendering a
report with holes. Nested sections (config, split, diagnostics, ...) stay plain JSON objects: they mirror files and
records of other modules (config.py, data/split.py, selection.py, runlog.py) that define their own keys.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterable

import numpy as np

from oodpl.errors import UserError
from oodpl.evaluation.stats import t_interval

SCHEMA_VERSION = 2


def _kwargs(cls: type, d: Any, where: str) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` from the JSON object `d`: a field without a default must be there
    (fields with one are the optional keys); keys that name no field are dropped."""
    if not isinstance(d, dict):
        raise UserError(f"results.json: {where} is a {type(d).__name__}, not an object (schema v{SCHEMA_VERSION}: "
                        "oodpl/results.py)")
    missing = [f.name for f in fields(cls)
               if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"results.json: {where} has no {', '.join(map(repr, missing))} (schema v{SCHEMA_VERSION}: "
                        "oodpl/results.py)")
    return {f.name: d[f.name] for f in fields(cls) if f.name in d}


def _json(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass(kw_only=True)
class Cell:
    """One (seed, held-out domain, method) cell, the unit of evidence: the eval record that `Benchmark.evaluate`
    writes to seed-S/eval/<method>/<domain>.json, plus the matched KL `Benchmark.collect` adds."""

    seed: int
    domain: str
    method: str
    beta: float | None  # the beta_test of the main metrics (the first one; None for methods without a meta-test)
    # metric -> value or None where it does not apply: pl_accuracy, rm_gold_agreement, gold_reward, kl,
    # win_rate_vs_reference, win_rate_vs_erm, own_sample_agreement, gold_at_matched_kl (report.METRIC_MEANING)
    metrics: dict[str, float | None]
    n: dict[str, int]  # counts behind the metrics: eval_pairs, agreement_pairs, eval_prompts, samples
    # metric -> {"values": per-unit values, "clusters": each unit's prompt}: what the within-cell bootstraps resample,
    # the same items in the same order for every method of a (seed, domain)
    units: dict[str, dict[str, list]]
    frontier: list[dict[str, Any]]  # per beta_test: beta, gold_reward, kl, gold_reward_ci
    reward_spread_ref: float | None = None  # spread of the method's reward on pi_ref samples (reward models only)
    matched_kl: float | None  # the KL every competing reward model's frontier reaches in this (seed, domain)

    def to_json(self) -> dict[str, Any]:
        return _json(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "a cell") -> Cell:
        return cls(**_kwargs(cls, d, where))


@dataclass(kw_only=True)
class Results:
    """A benchmark run: its settings, every cell and the diagnostics beside them (results.json)."""

    version: int = SCHEMA_VERSION
    config: dict[str, Any]  # the run's full configuration (Config.to_dict)
    seeds: list[int]  # the seeds reported, in run order
    methods: list[str]  # the methods run, warm starts first (methods.with_warm_starts)
    # method -> summary, output, reward_backbone, warm_start, target_prompts, target_labels (methods.method_notes)
    method_notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: list[str]  # the methods every other method is compared with (methods.BASELINES that ran)
    split: dict[str, Any]  # task, and per meta-train / held-out domain its counts (DomainSplit.summary)
    domains: list[str]  # the held-out domains, sorted
    betas: list[float]  # meta_test.beta_test: one frontier point each
    cells: list[Cell]  # one per (seed, domain, method), seed by seed, domain by domain
    samples_table: dict[str, list[dict[str, str]]]  # domain -> rows of prompt and one sample per shown method
    # "seed-S" -> method -> diagnostic -> value (grad_ratio, reward_spread_ref, distance_from_warm_start, ...);
    # "left_out_meta_train_domains": the selection's leave-one-domain-out outer losses, with benchmark.select
    diagnostics: dict[str, Any]
    left_out: list[dict[str, Any]] = field(default_factory=list)  # per seed: inner steps scored on left-out domains
    fit: list[dict[str, Any]] = field(default_factory=list)  # per seed: the same on the meta-train domains
    meta_curves: dict[str, dict[str, list[dict[str, Any]]]]  # "seed-S" -> method -> logged outer steps
    selection: dict[str, dict[str, Any]]  # tuned method -> criterion, folds, best, set_flags, candidates
    timings: dict[str, Any]  # units, by_stage, by_method, total_unit_seconds, wall_seconds_this_run
    provenance: dict[str, Any]  # command, date, machine, wall_seconds, load (runlog.provenance), note

    def to_json(self) -> dict[str, Any]:
        """The dict results.json holds (atomic_write_json writes it as is)."""
        return {**_json(self), "cells": [c.to_json() for c in self.cells]}

    # ----------------------------------------------------------------- what the report and the plots ask of a run
    def ran_methods(self) -> list[str]:
        """Methods with at least one cell, in `methods` order (then any others in order of appearance)."""
        seen = list(dict.fromkeys(c.method for c in self.cells))
        listed = [m for m in self.methods if m in seen]
        return listed + [m for m in seen if m not in listed]

    def domain_names(self) -> list[str]:
        """The held-out domains (those of the cells when the run lists none)."""
        return list(self.domains or sorted({c.domain for c in self.cells}))

    def seed_names(self) -> list:
        """The seeds (those of the cells when the run lists none)."""
        return list(self.seeds or sorted({c.seed for c in self.cells}))

    def has(self, method: str, metric: str) -> bool:
        """Whether some cell of `method` carries a value of `metric`."""
        return any(c.method == method and c.metrics.get(metric) is not None for c in self.cells)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Results:
        """A results.json dict as Results; UserError for another schema version or a missing required key."""
        found = d.get("version") if isinstance(d, dict) else None
        if found != SCHEMA_VERSION:
            raise UserError(f"results.json has schema version {found!r}; this oodpl reads version {SCHEMA_VERSION}")
        kw = _kwargs(cls, d, "the file")
        if not isinstance(kw["cells"], list):
            raise UserError(f"results.json: 'cells' is a {type(kw['cells']).__name__}, not a list")
        kw["cells"] = [Cell.from_json(c, f"cell {i}") for i, c in enumerate(kw["cells"])]
        return cls(**kw)


def as_results(results: Results | dict[str, Any]) -> Results:
    """Results as they are; a results.json dict through Results.from_json (report.py's entry points take either)."""
    return results if isinstance(results, Results) else Results.from_json(results)


def _same(a: Any, b: Any, rel: float = 1e-6) -> bool:
    """Equal JSON values, floats within `rel` (the same computation, written by two runs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= rel * max(1.0, abs(a), abs(b))
    return a == b


def _without_methods(config: dict[str, Any]) -> dict[str, Any]:
    bench = {k: v for k, v in (config.get("benchmark") or {}).items() if k != "methods"}
    return {**config, "benchmark": bench}


def merge_results(base: Results, other: Results, other_name: str = "the other run") -> Results:
    """`base` with the methods only `other` ran added: one set of paired cells from two benchmark runs of one
    protocol (an evidence preset split in parts to fit a time budget). Refused (UserError) unless both have the same
    configuration apart from benchmark.methods (so the same split, seeds, held-out prompts and shared pi_ref samples)
    and every method both ran has the same cells and left-out scores in both: the check that the pairing holds."""
    if _without_methods(base.config) != _without_methods(other.config):
        diff = sorted(k for k in set(base.config) | set(other.config)
                      if _without_methods(base.config).get(k) != _without_methods(other.config).get(k))
        raise UserError(f"{other_name}: its configuration differs from the base run's in {', '.join(diff)}; only "
                        "benchmark.methods may differ between runs whose cells are paired")
    if base.split != other.split or base.seeds != other.seeds or base.domains != other.domains:
        raise UserError(f"{other_name}: another split or other seeds than the base run's; its cells do not pair")
    common = [m for m in other.methods if m in base.methods]
    new = [m for m in other.methods if m not in base.methods]
    if not common:
        raise UserError(f"{other_name} shares no method with the base run, so nothing shows that their cells pair")
    key = lambda c: (c.seed, c.domain, c.method)  # noqa: E731
    mine = {key(c): c for c in base.cells}
    for c in other.cells:
        if c.method in common and (key(c) not in mine or not _same(mine[key(c)].to_json(), c.to_json())):
            raise UserError(f"{other_name}: {c.method}'s cell (seed {c.seed}, {c.domain}) differs from the base "
                            "run's; the runs did not compute the same thing, so their cells do not pair")
    merged = Results.from_json(base.to_json())  # a deep copy
    order = {m: i for i, m in enumerate(base.methods + new)}
    merged.methods = base.methods + new
    merged.method_notes = {**base.method_notes, **{m: other.method_notes[m] for m in new if m in other.method_notes}}
    merged.baselines = [m for m in merged.methods if m in set(base.baselines) | set(other.baselines)]
    merged.cells = sorted(merged.cells + [Cell.from_json(c.to_json()) for c in other.cells if c.method in new],
                          key=lambda c: (base.seeds.index(c.seed), c.domain, order[c.method]))
    for seed_key, per in other.diagnostics.items():
        if isinstance(per, dict):
            merged.diagnostics.setdefault(seed_key, {}).update({m: v for m, v in per.items() if m in new})
    for seed_key, per in other.meta_curves.items():
        merged.meta_curves.setdefault(seed_key, {}).update({m: v for m, v in per.items() if m in new})
    merged.selection.update({m: v for m, v in other.selection.items() if m in new})
    merged.left_out = _merge_scored(base.left_out, other.left_out, common, new, other_name)
    merged.fit = _merge_scored(base.fit, other.fit, common, new, other_name)
    rows = {d: [dict(r) for r in rs] for d, rs in base.samples_table.items()}
    for d, rs in other.samples_table.items():
        for mine_row, row in zip(rows.get(d, []), rs):
            if mine_row.get("prompt") == row.get("prompt"):
                mine_row.update({m: v for m, v in row.items() if m in new})
    merged.samples_table = rows
    p = other.provenance
    merged.provenance["merged"] = (f"the cells of {', '.join(new) or 'no new method'} come from `{p.get('command')}` "
                                   f"on {p.get('date')}, wall time {float(p.get('wall_seconds') or 0) / 60:.1f} min, "
                                   f"load {p.get('load')}; paired with this run's cells (the same configuration "
                                   f"but benchmark.methods, checked: {', '.join(common)} identical in both)")
    return merged


def _merge_scored(base: list[dict], other: list[dict], common: list[str], new: list[str], other_name: str) -> list:
    """The per-seed left-out / fit records of two runs, the new methods' scores and leverage entries added; the
    draws both scored (headroom, the oracle, the common methods) must agree."""
    if not other:
        return [dict(r) for r in base]
    if not base:
        return [] if not new else [dict(r) for r in other]
    by_seed = {r["seed"]: r for r in other}
    out = []
    for mine in base:
        theirs = by_seed.get(mine["seed"])
        rec = json.loads(json.dumps(mine))
        if theirs is None:
            out.append(rec)
            continue
        if rec.get("domains") != theirs.get("domains"):
            raise UserError(f"{other_name}: its diagnostic scored other domains than the base run's")
        for m in common:
            if m in theirs["methods"] and not _same(theirs["methods"][m], rec["methods"].get(m)):
                raise UserError(f"{other_name}: {m}'s diagnostic scores differ from the base run's (seed "
                                f"{mine['seed']}); the runs did not draw the same inner batches")
        rec["methods"].update({m: v for m, v in theirs["methods"].items() if m in new})
        for d, draws in (theirs.get("leverage") or {}).items():
            mine_draws = rec.get("leverage", {}).get(d)
            if mine_draws is None or len(mine_draws) != len(draws):
                raise UserError(f"{other_name}: its leverage draws of {d} do not match the base run's")
            for a, b in zip(mine_draws, draws):
                if not _same(a.get("headroom"), b.get("headroom")) or not _same(a.get("oracle"), b.get("oracle")):
                    raise UserError(f"{other_name}: the headroom of a draw of {d} differs from the base run's; the "
                                    "runs did not draw the same inner batches")
                a.update({m: v for m, v in b.items() if m in new})
        out.append(rec)
    return out


def seed_level(cells: Iterable[Cell], method: str, metric: str, domain: str | None = None) -> dict:
    """A method's metric over cells (results.cells, or a diagnostic's): per seed, the mean over the domains (or the
    one `domain`) that have it, then a 95% t-interval over seeds. Returns the t_interval dict plus "cells" (how many
    cells had a value)."""
    by_seed: dict[Any, list[float]] = {}
    for c in cells:
        if c.method == method and (domain is None or c.domain == domain):
            v = c.metrics.get(metric)
            if v is not None:
                by_seed.setdefault(c.seed, []).append(float(v))
    out = t_interval([float(np.mean(v)) for v in by_seed.values()])
    out["cells"] = sum(len(v) for v in by_seed.values())
    return out
