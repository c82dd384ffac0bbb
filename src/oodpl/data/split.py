"""Deterministic meta-train / held-out domain splits.

Within a domain every record is keyed by its prompt text. A key (with all its pairs, or its prompt) goes to exactly
one role, so no prompt is shared between the support, query, eval and oracle sets of a domain:

- meta-train domain: `support` (prompts, `support_size`) and `query` (pairs, `query_size`);
- held-out domain: `adapt_prompts` (prompts, `adapt_prompts`: the meta-test optimises the policy on these, never
  on the prompts it is scored on), `eval_prompts` (prompts, `eval_prompts`), `eval_pairs` (pairs, `eval_pairs`) and
  `oracle` (pairs: every remaining key; training data for the oracle upper-bound baseline only).

Keys are shuffled with `random.Random(f"{seed}:{domain}")` and dealt one at a time to the eligible role that is least
full relative to its target (ties: the order above; oracle counts as target `eval_pairs` until the capped roles are
full, then takes the rest). A key is eligible for a prompt role when the domain's prompt pool has it, and for a pair
role when it has pairs. Afterwards oracle pairs whose chosen text is the chosen text of an eval pair or an eval
prompt's reference are dropped, so the oracle baseline never learns that an evaluation answer is good; only the
methods that train on oracle pairs (oracle-rm) require them (`require_oracle_pairs`), and its error says why a
domain has too few. (A rejected
text may recur across roles: in the knowledge task negatives are replies to other prompts of the same category.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodpl.config import DataConfig
from oodpl.errors import UserError, atomic_write_json
from oodpl.paths import safe_name
from oodpl.data.records import (PairRecord, PromptRecord, prompts_from_pairs, read_pairs, read_prompts,
                                record_json_factory)

MIN_PAIRS = 2
MIN_PROMPTS = 1


@dataclass
class MetaTrainDomain:
    name: str
    support_prompts: list[PromptRecord] = field(default_factory=list)
    query_pairs: list[PairRecord] = field(default_factory=list)


@dataclass
class HeldOutDomain:
    name: str
    adapt_prompts: list[PromptRecord] = field(default_factory=list)  # meta-test optimisation (no labels used)
    eval_prompts: list[PromptRecord] = field(default_factory=list)
    eval_pairs: list[PairRecord] = field(default_factory=list)
    oracle_pairs: list[PairRecord] = field(default_factory=list)
    # oracle pairs dropped because their chosen text is an evaluation answer (see the module docstring)
    oracle_dropped: int = 0


@dataclass
class DomainSplit:
    task: str
    meta_train: dict[str, MetaTrainDomain]
    held_out: dict[str, HeldOutDomain]

    def pooled_pairs(self) -> list[PairRecord]:
        """All meta-train query pairs (the `erm-rm` / `dpo` training set), in domain-name order."""
        return [p for name in sorted(self.meta_train) for p in self.meta_train[name].query_pairs]

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "meta_train": {n: {"support_prompts": len(d.support_prompts), "query_pairs": len(d.query_pairs)}
                           for n, d in self.meta_train.items()},
            "held_out": {n: {"adapt_prompts": len(d.adapt_prompts), "eval_prompts": len(d.eval_prompts),
                             "eval_pairs": len(d.eval_pairs),
                             "oracle_pairs": len(d.oracle_pairs)} for n, d in self.held_out.items()},
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict (store it with `atomic_write_json` or `save`)."""
        return {
            "task": self.task,
            "meta_train": {n: dataclasses.asdict(d, dict_factory=record_json_factory)
                           for n, d in self.meta_train.items()},
            "held_out": {n: dataclasses.asdict(d, dict_factory=record_json_factory) for n, d in self.held_out.items()},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str) -> "DomainSplit":
        """Inverse of `to_json`; also accepts the JSON text."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        try:
            meta = {
                n: MetaTrainDomain(
                    name=d["name"],
                    support_prompts=[PromptRecord(**p) for p in d["support_prompts"]],
                    query_pairs=[PairRecord(**p) for p in d["query_pairs"]],
                )
                for n, d in obj["meta_train"].items()
            }
            held = {
                n: HeldOutDomain(
                    name=d["name"],
                    adapt_prompts=[PromptRecord(**p) for p in d.get("adapt_prompts", [])],
                    eval_prompts=[PromptRecord(**p) for p in d["eval_prompts"]],
                    eval_pairs=[PairRecord(**p) for p in d["eval_pairs"]],
                    oracle_pairs=[PairRecord(**p) for p in d["oracle_pairs"]],
                    oracle_dropped=int(d.get("oracle_dropped", 0)),
                )
                for n, d in obj["held_out"].items()
            }
            return cls(task=obj["task"], meta_train=meta, held_out=held)
        except (KeyError, TypeError) as e:
            raise UserError(f"stored split is not in the DomainSplit format ({e!r}); rebuild it from the config") \
                from None

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "DomainSplit":
        path = Path(path)
        try:
            split = cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise UserError(f"{path}: cannot read the stored split ({type(e).__name__}: {str(e)[:120]}); rebuild it "
                            "or choose another run") from None
        for name in [*split.meta_train, *split.held_out]:  # names of directories: the file may have been edited
            safe_name(name, where=str(path))
        return split


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_records(cfg: DataConfig) -> tuple[list[PairRecord], list[PromptRecord]]:
    """Pairs and prompts of the configured task (built-in or file)."""
    if cfg.task == "file":
        if not cfg.path:
            raise UserError("config: data.task is 'file' but data.path is not set; set data.path to a pairs file")
        hub = {"name": cfg.hub_config, "data_dir": cfg.hub_data_dir, "split": cfg.hub_split}
        pairs = read_pairs(cfg.path, cfg.columns, cfg.encoding, cfg.domain, hub)
        if cfg.prompts_path:
            prompts = read_prompts(cfg.prompts_path, cfg.columns, cfg.encoding, cfg.domain, hub)
        else:
            prompts = prompts_from_pairs(pairs)
        return pairs, prompts
    from oodpl.data import builtin

    if cfg.task not in builtin.TASKS:
        raise UserError(
            f"config: data.task {cfg.task!r} is unknown; use one of {', '.join(sorted(builtin.TASKS))} or 'file'"
        )
    return builtin.load_task(cfg.task)


def default_held_out_for(task: str, domains: list[str]) -> list[str]:
    """Built-in tasks: their fixed list. Files: every third domain in name order (the last one when only two)."""
    from oodpl.data import builtin

    if task in builtin.TASKS:
        return builtin.default_held_out(task)
    names = sorted(domains)
    if len(names) < 2:
        raise UserError(
            f"data: the data has {len(names)} domain ({', '.join(names) or 'none'}); meta-learning needs at least "
            "two (one meta-train, one held-out); add a domain column with several values"
        )
    held = [n for i, n in enumerate(names) if i % 3 == 2]
    return held or [names[-1]]


# ----------------------------------------------------------------------------------------------------------------------
# Splitting


def _key(text: str) -> str:
    return " ".join(text.split())


_ROLE_KIND = {"support": "prompt", "query": "pair", "adapt_prompts": "prompt", "eval_prompts": "prompt",
              "eval_pairs": "pair", "oracle": "pair"}


def _deal(domain: str, seed: int, pairs: list[PairRecord], prompts: list[PromptRecord],
          targets: dict[str, int | None], soft: dict[str, int]) -> dict[str, list]:
    """Assign each prompt key of one domain to one role; return role -> records."""
    by_key_pairs: dict[str, list[PairRecord]] = {}
    for p in pairs:
        by_key_pairs.setdefault(_key(p.prompt), []).append(p)
    by_key_prompt: dict[str, PromptRecord] = {}
    for x in prompts:
        by_key_prompt.setdefault(_key(x.prompt), x)
    keys = sorted(set(by_key_pairs) | set(by_key_prompt))
    random.Random(f"{seed}:{domain}").shuffle(keys)
    out: dict[str, list] = {r: [] for r in targets}
    capped = [r for r, t in targets.items() if t is not None]
    for key in keys:
        if all(len(out[r]) >= targets[r] for r in capped) and not any(t is None for t in targets.values()):
            break
        eligible = []
        for role, target in targets.items():
            kind = _ROLE_KIND[role]
            if kind == "prompt" and key not in by_key_prompt or kind == "pair" and key not in by_key_pairs:
                continue
            if target is not None and len(out[role]) >= target:
                continue
            eligible.append(role)
        if not eligible:
            continue
        capped_open = [r for r in eligible if targets[r] is not None]
        if capped_open:
            # uncapped roles compete with their soft target until every capped role is full
            pool = eligible if any(targets[r] is None for r in eligible) else capped_open
        else:
            pool = eligible

        def fill(r: str) -> float:
            t = targets[r] if targets[r] is not None else soft.get(r, 1)
            return len(out[r]) / max(t, 1)

        role = min(pool, key=lambda r: (fill(r), list(targets).index(r)))
        if _ROLE_KIND[role] == "prompt":
            out[role].append(by_key_prompt[key])
        else:
            room = targets[role] - len(out[role]) if targets[role] is not None else None
            group = by_key_pairs[key]
            out[role].extend(group if room is None else group[:room])
    return out


def _check_role_counts(domain: str, kind: str, counts: dict[str, int], available: tuple[int, int],
                       distinct: int) -> None:
    """Every role of a domain needs MIN_PROMPTS prompts / MIN_PAIRS pairs; the error names the short roles and why."""
    need = {r: MIN_PROMPTS if _ROLE_KIND[r] == "prompt" else MIN_PAIRS for r in counts}
    short = [r for r, n in counts.items() if n < need[r]]
    if short:
        got = ", ".join(f"{r} has {counts[r]} {_ROLE_KIND[r]}{'s' if counts[r] != 1 else ''} (needs >= {need[r]})"
                        for r in short)
        raise UserError(
            f"data: {kind} domain {domain} has too little data after the split: {got}; the domain has "
            f"{available[0]} pairs and {available[1]} prompts with {distinct} distinct prompt texts, and each distinct "
            f"prompt serves one role only ({', '.join(counts)}); add data, lower the sizes (data.support_size, "
            "data.query_size, data.adapt_prompts, data.eval_prompts, data.eval_pairs) or choose another "
            f"{'held-out' if kind == 'held-out' else 'meta-train'} domain"
        )


def require_oracle_pairs(split: "DomainSplit") -> None:
    """The oracle-rm baseline trains on each held-out domain's oracle pairs: refuse a split where a domain has too
    few, saying why (only the methods that use oracle pairs call this)."""
    for name, ho in sorted(split.held_out.items()):
        if not ho.eval_pairs and not ho.oracle_pairs:
            raise UserError(f"data: held-out domain {name} has prompts only (no labelled pairs), but oracle-rm trains "
                            "on its pairs; remove oracle-rm from benchmark.methods or add pairs for the domain")
        if len(ho.oracle_pairs) < MIN_PAIRS:
            why = (f"{ho.oracle_dropped} of its {ho.oracle_dropped + len(ho.oracle_pairs)} oracle pairs were dropped "
                   "because their chosen text is the chosen text of an eval pair or an eval prompt's reference (the "
                   "oracle must not learn that an evaluation answer is good)" if ho.oracle_dropped
                   else "the eval roles took the domain's other prompts")
            if ho.oracle_dropped and not ho.oracle_pairs:
                why = "all oracle pairs duplicate eval pairs: " + why
            raise UserError(f"data: held-out domain {name} has {len(ho.oracle_pairs)} oracle pairs (oracle-rm needs "
                            f">= {MIN_PAIRS}): {why}; add pairs with other answers, lower data.eval_pairs, or remove "
                            "oracle-rm from benchmark.methods")


def _distinct(pairs: list[PairRecord], prompts: list[PromptRecord]) -> int:
    return len({_key(p.prompt) for p in pairs} | {_key(x.prompt) for x in prompts})


def _meta_train_domain(name: str, dp: list[PairRecord], dx: list[PromptRecord], cfg: DataConfig) -> MetaTrainDomain:
    """One domain's support prompts and query pairs (dealt by `_deal`; too little data is a UserError)."""
    out = _deal(name, cfg.seed, dp, dx, {"support": cfg.support_size, "query": cfg.query_size}, {})
    _check_role_counts(name, "meta-train", {"support": len(out["support"]), "query": len(out["query"])},
                       (len(dp), len(dx)), _distinct(dp, dx))
    return MetaTrainDomain(name=name, support_prompts=out["support"], query_pairs=out["query"])


def split_records(task: str, pairs: list[PairRecord], prompts: list[PromptRecord], cfg: DataConfig) -> DomainSplit:
    """Split already loaded records according to `cfg` (see the module docstring)."""
    pairs_by: dict[str, list[PairRecord]] = {}
    for p in pairs:
        pairs_by.setdefault(p.domain, []).append(p)
    prompts_by: dict[str, list[PromptRecord]] = {}
    for x in prompts:
        prompts_by.setdefault(x.domain, []).append(x)
    known = sorted(set(pairs_by) | set(prompts_by))

    held = list(cfg.held_out_domains) if cfg.held_out_domains is not None else default_held_out_for(task, known)
    for name in held:
        if name not in known:
            raise UserError(f"data.held_out_domains: unknown domain {name!r}; known domains are {', '.join(known)}")
    if cfg.meta_train_domains is not None:
        meta = list(cfg.meta_train_domains)
        for name in meta:
            if name not in known:
                raise UserError(
                    f"data.meta_train_domains: unknown domain {name!r}; known domains are {', '.join(known)}"
                )
        both = sorted(set(meta) & set(held))
        if both:
            raise UserError(
                f"data: domain {both[0]} is both meta-train and held-out; remove it from data.meta_train_domains "
                "or data.held_out_domains"
            )
    else:
        meta = [n for n in known if n not in set(held)]
    if len(set(held)) != len(held) or len(set(meta)) != len(meta):
        dup = next(n for n in held + meta if (held + meta).count(n) > 1)
        raise UserError(f"data: domain {dup} is listed twice; list each domain once")
    if not held:
        raise UserError("data.held_out_domains is empty; hold out at least one domain")
    if not meta:
        raise UserError("data: no meta-train domains are left; hold out fewer domains or set data.meta_train_domains")
    if cfg.max_domains is not None:
        if cfg.max_domains < 1:
            raise UserError(f"data.max_domains must be >= 1 or null, got {cfg.max_domains}")
        if len(meta) > cfg.max_domains:
            meta = sorted(random.Random(f"{cfg.seed}:max_domains").sample(sorted(meta), cfg.max_domains))
    for name, size in (("support_size", cfg.support_size), ("query_size", cfg.query_size),
                       ("adapt_prompts", cfg.adapt_prompts), ("eval_prompts", cfg.eval_prompts),
                       ("eval_pairs", cfg.eval_pairs)):
        if size < 1:
            raise UserError(f"data.{name} must be >= 1, got {size}")
    for name in meta + held:
        n_pairs, n_prompts = len(pairs_by.get(name, [])), len(prompts_by.get(name, []))
        if name in held and n_prompts > 0:
            continue  # a held-out domain needs prompts only (labels feed the label-based metrics when present)
        if n_pairs == 0 or n_prompts == 0:
            raise UserError(
                f"data: {'held-out' if name in held else 'meta-train'} domain {name} has {n_pairs} pairs and "
                f"{n_prompts} prompts; a meta-train domain needs both and a held-out domain needs prompts "
                "(check the domain column of the prompts file, or leave the domain out)"
            )

    split = DomainSplit(task=task, meta_train={}, held_out={})
    for name in sorted(meta):
        split.meta_train[name] = _meta_train_domain(name, pairs_by[name], prompts_by[name], cfg)
    for name in sorted(held):
        dp, dx = pairs_by.get(name, []), prompts_by[name]
        targets: dict[str, int | None] = {"adapt_prompts": cfg.adapt_prompts, "eval_prompts": cfg.eval_prompts}
        if dp:  # prompt-only (unlabeled) held-out domains have no pair roles
            targets.update({"eval_pairs": cfg.eval_pairs, "oracle": None})
        out = _deal(name, cfg.seed, dp, dx, targets, {"oracle": cfg.eval_pairs})
        out.setdefault("eval_pairs", [])
        out.setdefault("oracle", [])
        good = {_key(p.chosen) for p in out["eval_pairs"]}
        good |= {_key(x.reference) for x in out["eval_prompts"] if x.reference}
        oracle = [p for p in out["oracle"] if _key(p.chosen) not in good]
        # oracle pairs are checked by the methods that train on them (require_oracle_pairs), not here
        counts = {"adapt_prompts": len(out["adapt_prompts"]), "eval_prompts": len(out["eval_prompts"])}
        if dp:
            counts["eval_pairs"] = len(out["eval_pairs"])
        _check_role_counts(name, "held-out", counts, (len(dp), len(dx)), _distinct(dp, dx))
        split.held_out[name] = HeldOutDomain(name=name, adapt_prompts=out["adapt_prompts"],
                                             eval_prompts=out["eval_prompts"],
                                             eval_pairs=out["eval_pairs"], oracle_pairs=oracle,
                                             oracle_dropped=len(out["oracle"]) - len(oracle))
    return split


def left_out_split(cfg: DataConfig, split: DomainSplit, limit: int = 3) -> DomainSplit:
    """Domains of the task that are neither held out nor in `split`'s meta-train set (left out by
    data.max_domains or data.meta_train_domains): up to `limit` of them (a seeded choice), dealt into support
    prompts and query pairs exactly as meta-train domains are. They serve diagnostics only (does a reward model's
    inner step lower the outer loss on meta-train-like domains no method was trained on); empty when none is left."""
    pairs, prompts = load_records(cfg)
    left = sorted({p.domain for p in pairs} & {x.domain for x in prompts} - set(split.held_out) - set(split.meta_train))
    random.Random(f"{cfg.seed}:left_out").shuffle(left)
    out = DomainSplit(split.task, {}, {})
    for name in left:
        if len(out.meta_train) == limit:
            break
        try:
            out.meta_train[name] = _meta_train_domain(name, [p for p in pairs if p.domain == name],
                                                      [x for x in prompts if x.domain == name], cfg)
        except UserError:  # too few prompts or pairs for the support / query sizes: not comparable, skip it
            continue
    out.meta_train = dict(sorted(out.meta_train.items()))
    return out


def build_split(cfg: DataConfig) -> DomainSplit:
    """Load the configured data and split it deterministically (given `cfg.seed`)."""
    pairs, prompts = load_records(cfg)
    return split_records(cfg.task, pairs, prompts, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def domain_stats(pairs: list[PairRecord], prompts: list[PromptRecord]) -> dict[str, dict[str, Any]]:
    """Per domain: counts and mean/max lengths in words (prompt, chosen, rejected, reference) and mean margin."""
    out: dict[str, dict[str, Any]] = {}
    domains = sorted({p.domain for p in pairs} | {x.domain for x in prompts})
    pairs_by: dict[str, list[PairRecord]] = {d: [] for d in domains}
    for p in pairs:
        pairs_by[p.domain].append(p)
    prompts_by: dict[str, list[PromptRecord]] = {d: [] for d in domains}
    for x in prompts:
        prompts_by[x.domain].append(x)

    def mm(values: list[int]) -> tuple[float, int]:
        return (round(statistics.fmean(values), 1), max(values)) if values else (0.0, 0)

    for d in domains:
        dp, dx = pairs_by[d], prompts_by[d]
        row: dict[str, Any] = {"pairs": len(dp), "prompts": len(dx),
                               "pair_prompts": len({_key(p.prompt) for p in dp})}
        for name, values in (("prompt", [_words(x.prompt) for x in dx]),
                             ("chosen", [_words(p.chosen) for p in dp]),
                             ("rejected", [_words(p.rejected) for p in dp])):
            row[f"{name}_words_mean"], row[f"{name}_words_max"] = mm(values)
        refs = [_words(x.reference) for x in dx if x.reference]
        row["with_reference"] = len(refs)
        margins = [p.margin for p in dp if p.margin is not None and math.isfinite(p.margin)]
        row["margin_mean"] = round(statistics.fmean(margins), 2) if margins else None
        out[d] = row
    return out


def held_out_from_prompts(prompts: list[PromptRecord], cfg: DataConfig) -> DomainSplit:
    """Prompt-only target domains (`oodpl meta-test --prompts`): per domain, a seeded shuffle of its distinct prompts
    gives `eval_prompts` evaluation prompts (at most half of them) and the rest as adaptation prompts (all of them:
    the user's domain); no pairs, so label-based metrics are skipped for these domains. A single prompt serves both."""
    by: dict[str, dict[str, PromptRecord]] = {}
    for x in prompts:
        by.setdefault(x.domain, {}).setdefault(_key(x.prompt), x)
    split = DomainSplit(task="prompts", meta_train={}, held_out={})
    for name in sorted(by):
        items = list(by[name].values())
        random.Random(f"{cfg.seed}:{name}").shuffle(items)
        n_eval = min(cfg.eval_prompts, len(items) // 2)
        evals, adapt = (items[:n_eval], items[n_eval:]) if n_eval else (items, items)
        split.held_out[name] = HeldOutDomain(name=name, adapt_prompts=adapt, eval_prompts=evals)
    if not split.held_out:
        raise UserError("the prompts file holds no prompts")
    return split


def load_or_build_split(path: Path | None, data: "DataConfig") -> "DomainSplit":
    """The split stored at `path` (a run being resumed, or the run whose files are read), else built from `data`."""
    return DomainSplit.load(path) if path is not None and path.exists() else build_split(data)
