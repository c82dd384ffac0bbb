"""The Python API: the config dataclasses and one function per stage, exported from `oodpl`.

    from oodpl import load_config, meta_train, align
    cfg = load_config("configs/tiny.yaml", overrides=["meta.outer_steps=4"])
    summary = meta_train("runs/meta", cfg, pairs=my_dataset)          # datasets.Dataset, list of dicts, path
    index = align("runs/align", cfg, summary["reward_model"], prompts=new_domain_prompts)

Every function is the same code as its CLI command (same checks, locks, resume and outputs); data may be a path, a
`datasets.Dataset`, a pandas DataFrame or a list of dicts / oodpl records in any shape `oodpl data validate`
accepts. In-memory data is written once, by content hash, to `$OODPL_CACHE/data/` (default ~/.cache/oodpl/data), so
that a run records where its data came from and resumes on the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable

from oodpl.config import Config, load_config, with_overrides
from oodpl.data.records import PairRecord, PromptRecord, record_to_dict
from oodpl.errors import UserError, atomic_write_text

Data = Any  # a path, datasets.Dataset, pandas.DataFrame, or an iterable of dicts / PairRecord / PromptRecord


def as_config(config: Config | str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """A Config from a Config (copied), a YAML path or None (the defaults), with dotted-key `overrides` checked."""
    if config is None or isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif not isinstance(config, Config):
        raise UserError(f"config: expected a oodpl Config, a YAML path or None, got a {type(config).__name__}")
    return with_overrides(config, overrides or {}, where="overrides")


def data_path(data: Data, kind: str) -> str:
    """A path for `data`: a path as given; in-memory rows written once to the data cache as JSONL (by content)."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    from oodpl.models.sources import cache_dir

    if hasattr(data, "to_dict") and not hasattr(data, "to_list"):  # pandas.DataFrame
        data = data.to_dict("records")
    rows = [record_to_dict(r) if isinstance(r, (PairRecord, PromptRecord)) else dict(r) for r in _iter(data)]
    if not rows:
        raise UserError(f"{kind}: no records; pass at least one row")
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    path = cache_dir() / "data" / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        atomic_write_text(path, text)
    return str(path)


def _iter(data: Data) -> Iterable:
    try:
        return iter(data)
    except TypeError:
        raise UserError(f"data: expected a path, a datasets.Dataset, a DataFrame or a list of rows, got a "
                        f"{type(data).__name__}") from None


def _with_data(cfg: Config, pairs: Data | None, prompts: Data | None, columns: dict[str, str] | None,
               domain: str | None) -> Config:
    data = dataclasses.replace(cfg.data)
    if pairs is not None:
        data.task, data.path = "file", data_path(pairs, "pairs")
    if prompts is not None:
        data.prompts_path = data_path(prompts, "prompts")
    if columns is not None:
        data.columns = dict(columns)
    if domain is not None:
        data.domain = domain
    return dataclasses.replace(cfg, data=data)


def meta_train(output: str | os.PathLike, config: Config | str | None = None, *, pairs: Data | None = None,
               prompts: Data | None = None, columns: dict[str, str] | None = None, domain: str | None = None,
               overrides: dict[str, Any] | None = None, resume: bool = False,
               init_reward_model: str | os.PathLike | None = None) -> dict:
    """`oodpl meta-train`: the general reward model, meta-trained over the meta-train domains of `pairs` (default:
    the config's data). Returns the run summary; summary["reward_model"] is a Hugging Face checkpoint directory."""
    from oodpl.train.metatrain import meta_train as _run

    cfg = _with_data(as_config(config, overrides), pairs, prompts, columns, domain)
    return _run(cfg, output, resume=resume, init_reward_model=init_reward_model)


def train_reward_model(output: str | os.PathLike, config: Config | str | None = None, *, pairs: Data | None = None,
                       columns: dict[str, str] | None = None, domain: str | None = None, method: str = "erm-rm",
                       overrides: dict[str, Any] | None = None) -> dict:
    """`oodpl train-rm`: a reward model by a stand-alone method of the registry (default erm-rm, Bradley-Terry) on
    `pairs` (default: the config's meta-train domains); per-domain accuracy on held-back pairs before and after."""
    from oodpl.experiment.train_rm import train_rm_command

    cfg = _with_data(as_config(config, overrides), None, None, columns, domain)
    return train_rm_command(cfg, output, None if pairs is None else data_path(pairs, "pairs"), cfg.data.columns,
                            method)


def align(output: str | os.PathLike, config: Config | str | None = None, reward_model: str | os.PathLike = "", *,
          prompts: Data | None = None, domains: list[str] | None = None, columns: dict[str, str] | None = None,
          domain: str | None = None, overrides: dict[str, Any] | None = None, merge: bool = False) -> dict:
    """`oodpl meta-test`: align the policy on new domains with a frozen reward model (any sequence-classification
    checkpoint). `prompts`: the target domains' prompts (no labels), else the config's held-out domains. Returns the
    index of the aligned policies (PEFT adapter directories) and their samples."""
    from oodpl.adapt.metatest import meta_test_command

    if not str(reward_model):
        raise UserError("align: pass reward_model, a reward-model checkpoint directory (e.g. a meta_train summary's "
                        "'reward_model')")
    cfg = as_config(config, overrides)
    return meta_test_command(cfg, str(reward_model), output, domains,
                             prompts=None if prompts is None else data_path(prompts, "prompts"), domain=domain,
                             columns=columns, merge=merge)


def generate(output: str | os.PathLike, config: Config | str | None = None, *, prompts: Data,
             policy: str | os.PathLike | None = None, num_samples: int = 1, max_new_tokens: int | None = None,
             seed: int | None = None, domain: str | None = None, columns: dict[str, str] | None = None,
             overrides: dict[str, Any] | None = None) -> dict:
    """`oodpl generate`: responses of an aligned policy (adapter or model directory; default the base policy) to
    `prompts`, written to the JSONL file `output`."""
    from oodpl.adapt.generate import generate_command

    cfg = as_config(config, overrides)
    return generate_command(cfg, None if policy is None else str(policy), data_path(prompts, "prompts"), str(output),
                            num_samples=num_samples, domain=domain, columns=columns or {},
                            max_new_tokens=max_new_tokens, seed=seed, quiet=cfg.quiet)


def benchmark(output: str | os.PathLike, config: Config | str | None = None, *,
              overrides: dict[str, Any] | None = None) -> dict:
    """`oodpl benchmark`: every method of cfg.benchmark.methods x held-out domain x seed; returns results.json."""
    from oodpl.experiment.benchmark import run_benchmark

    return run_benchmark(as_config(config, overrides), output).to_json()


def leverage_study(output: str | os.PathLike, config: Config | str | None = None, *, domains: list[str] | None = None,
                   draws: int = 3, overrides: dict[str, Any] | None = None) -> dict:
    """`oodpl diagnose leverage`: headroom, oracle drop and alignment per setting on meta-train domains."""
    from oodpl.experiment.leverage_study import run_leverage_study

    return run_leverage_study(as_config(config, overrides), output, domains, draws)
