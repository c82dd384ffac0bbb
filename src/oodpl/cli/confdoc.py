"""`oodpl config show [SECTION]`: every config key with its default and one line of meaning.

The meaning is the comment written beside (or just above) the field in oodpl/config.py, so the listing cannot drift
from the code; tests/test_journey.py checks that every key has one.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from oodpl import config as config_module
from oodpl.config import Config
from oodpl.errors import UserError

_FIELD = re.compile(r"^\s{4}(\w+)\s*:[^=#]*(?:=.*?)?(?:#\s*(.*))?$")


def _comments(cls) -> dict[str, str]:
    """field name -> its comment (same line, else the comment lines right above it), from the class source."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@", "class ", '"""')):
            same = (m.group(2) or "").strip()
            # a multi-line comment above is a paragraph: keep its first sentence-ish line, joined
            text = same or " ".join(above)
            out[m.group(1)] = text
        above = []
    return out


# meanings of the settings that carry no comment in config.py
EXTRA: dict[str, str] = {
    "data.seed": "seed of the domain split and of the prompt/pair draws",
    "policy.gguf_file": "the GGUF file inside policy.name_or_path when it is a directory holding several",
    "policy.lora_r": "LoRA rank of the policy adapters",
    "policy.lora_alpha": "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)",
    "policy.max_prompt_tokens": "prompts keep their last this many tokens",
    "policy.max_new_tokens": "longest sampled response, in tokens",
    "policy.temperature": "sampling temperature (1 = samples from pi itself, as the importance weights assume)",
    "policy.top_k": "top-k sampling (0 = off)",
    "policy.top_p": "nucleus sampling (1 = off)",
    "reward.max_length": "reward-model inputs are cut to this many tokens",
    "meta.outer_steps": "outer (reward-model) steps of meta-training",
    "meta.grad_clip": "clip of the hypergradient norm (0 = off)",
    "meta.checkpoint_every": "outer steps between checkpoints",
    "meta.log_every": "outer steps between metrics lines",
    "meta_test.lr": "learning rate of the meta-test policy optimiser",
    "meta_test.beta_test": "KL strengths of the meta-test; one aligned policy per value",
    "train_rm.epochs": "passes over the pooled pairs",
    "train_rm.lr": "AdamW learning rate",
    "train_rm.batch_size": "pairs per step",
    "eval.llm_url": "llm judge: an OpenAI-compatible server (http://host:port, /v1 or the full chat-completions URL)",
    "eval.llm_model": "llm judge: the model name the server serves",
    "eval.samples_per_prompt": "policy samples per evaluation prompt",
    "benchmark.methods": "methods compared (reference, erm-rm, erm-rm-extra, dpo, meta-rm, ablations, oracle-rm, "
                         "gold-reward)",
    "benchmark.seeds": "seeds; each method x held-out domain runs once per seed",
    "benchmark.dpo_epochs": "DPO baseline: passes over the pooled pairs",
    "benchmark.dpo_lr": "DPO baseline: Adam learning rate",
    "seed": "seed of models, sampling and training",
    "quiet": "no progress bars (same as --quiet)",
}


SECTIONS = {"eval": "Evaluation of aligned policies and reward models: judges and samples.",
            "benchmark": "The benchmark: methods compared, seeds, DPO baseline settings."}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def settings_table(section: str | None = None, cfg: Config | None = None) -> list[tuple[str, str, str]]:
    """[(dotted key, value as YAML, full meaning)] of every setting, or of one section: the defaults, or the
    effective values of `cfg` (a loaded config)."""
    cfg = cfg if cfg is not None else Config()
    rows: list[tuple[str, str, str]] = []
    top = _comments(Config)
    sections = [f.name for f in dataclasses.fields(cfg)]
    if section is not None and section not in sections:
        raise UserError(f"config show: unknown section {section!r}; the sections and top-level keys are "
                        f"{', '.join(sections)}")
    for f in dataclasses.fields(cfg):
        if section is not None and f.name != section:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            doc = _comments(type(value))
            for g in dataclasses.fields(value):
                meaning = doc.get(g.name) or EXTRA.get(f"{f.name}.{g.name}", "")
                rule = config_module.RULES.get(f"{f.name}.{g.name}")
                if rule and ("|" in rule) and rule not in meaning:
                    meaning = (meaning + f" [{rule}]").strip()
                rows.append((f"{f.name}.{g.name}", _yaml(getattr(value, g.name)), _one_line(meaning)))
        else:
            meaning = top.get(f.name) or EXTRA.get(f.name, "")
            rule = config_module.RULES.get(f.name)
            if rule and "|" in rule:
                meaning = (meaning + f" [{rule}]").strip()
            rows.append((f.name, _yaml(value), _one_line(meaning)))
    return rows


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def render(section: str | None = None, cfg: Config | None = None, width: int = 118) -> str:
    """The settings table: key, value, meaning (in full, wrapped under the row). With `cfg` the values are the
    effective ones and a setting that differs from its default says so."""
    import textwrap

    rows = settings_table(section, cfg)
    defaults = dict((k, d) for k, d, _ in settings_table(section)) if cfg is not None else {}
    values = [d if defaults.get(k, d) == d else f"{d} (default {defaults[k]})" for k, d, _ in rows]
    kw = max(len(k) for k, _, _ in rows)
    dw = min(28, max(len(v) for v in values))
    lines = []
    for (k, _, m), v in zip(rows, values):
        head = f"{k:<{kw}}  {v:<{dw}}  "
        lead = " " * len(head) if len(head) < width // 2 else "    "
        lines += textwrap.wrap(m, width, initial_indent=head, subsequent_indent=lead) or [head.rstrip()]
    return "\n".join(line.rstrip() for line in lines)


def section_docs() -> str:
    """One line per section (its class docstring's first line), for --help epilogs."""
    cfg = Config()
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            doc = (inspect.getdoc(type(value)) or "").splitlines()
            first = doc[0] if doc and not doc[0].startswith(type(value).__name__ + "(") else SECTIONS.get(f.name, "")
            lines.append(f"  {f.name + ':':<12} {first}")
    return "\n".join(lines)


