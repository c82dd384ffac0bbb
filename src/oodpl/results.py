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

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import UserError

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
