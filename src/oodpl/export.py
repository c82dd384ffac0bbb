"""The aligned policy as a standard artefact, and back.

`save_policy` writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors + the tokenizer), whose
adapter_config.json records the base model (a hub id or an absolute local path), so that

    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("<run>/policies/<domain>/beta_0.1")

loads it with peft alone and `model.generate` samples from it. Base models that exist only in code (the tiny test
models) or only as a GGUF file are saved once as a plain checkpoint (`base_dir`) and that path is recorded.
`merge=True` also writes `<directory>/merged/`, the full model with the adapters folded in (plain transformers).
A fully fine-tuned policy (policy.trainable: full) is saved as a full model. `oodpl_policy.json` beside it records
how prompts are rendered (chat template, prompt/response token budgets) for `oodpl generate`.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, atomic_directory
from .models import Policy

log = logging.getLogger(__name__)

POLICY_META = "oodpl_policy.json"


def _loadable_base(policy: Policy) -> str | None:
    """The base model's source as from_pretrained accepts it anywhere (hub id or absolute path), or None."""
    name = ""
    peft_cfg = getattr(policy.model, "peft_config", None)
    if peft_cfg:
        name = peft_cfg["default"].base_model_name_or_path or ""
    name = name or getattr(getattr(policy.model, "config", None), "_name_or_path", "") or ""
    if not name:
        return None
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return str(p.resolve())
    if p.exists() or name.startswith((".", "/", "~")):
        return None  # a GGUF file or a path that is gone: save the base as a plain checkpoint
    return name  # a hub id


def save_base_model(policy: Policy, directory: str | Path) -> Path:
    """The policy's reference model pi_ref (adapters removed, not merged) as a plain checkpoint, written once."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory.resolve()
    model = copy.deepcopy(policy.model)
    base = model.unload() if hasattr(model, "unload") else model
    with atomic_directory(directory) as tmp:
        base.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
    return directory.resolve()


def _model_card(meta: dict[str, Any], merged: bool) -> str:
    lines = ["---", "library_name: peft" if meta.get("adapter") else "library_name: transformers",
             f"base_model: {meta.get('base_model')}" if meta.get("base_model") else "", "tags: [oodpl]", "---", "",
             "# Policy aligned with oodpl", ""]
    info = {k: meta[k] for k in ("domain", "beta_test", "method", "steps") if meta.get(k) is not None}
    if info:
        lines.append("Aligned " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".")
        lines.append("")
    if meta.get("adapter"):
        lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  "", 'path = "."  # this directory', "model = AutoPeftModelForCausalLM.from_pretrained(path)",
                  "tok = AutoTokenizer.from_pretrained(path)"]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'path = "."  # this directory', "model = AutoModelForCausalLM.from_pretrained(path)",
                  "tok = AutoTokenizer.from_pretrained(path)"]
    lines += ['inputs = tok(["How do I keep basil fresh?"], return_tensors="pt")',
              "out = model.generate(**inputs, do_sample=True, max_new_tokens=32)",
              "print(tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))", "```", "",
              "Or: `oodpl generate --policy <this directory> --prompts prompts.jsonl --output samples.jsonl`."]
    if merged:
        lines += ["", "`merged/` holds the same policy with the adapters folded in (plain transformers)."]
    return "\n".join(lines) + "\n"


def save_policy(policy: Policy, directory: str | Path, base_dir: str | Path | None = None, merge: bool = False,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write the current pi_theta of `policy` to `directory` (atomically); see the module docstring.

    `base_dir`: where a base model that cannot be referred to is saved (default `<directory>/base_model`; give a
    shared path when saving several adapters of one run). Returns the directory."""
    directory = Path(directory)
    cfg = policy.config
    meta: dict[str, Any] = {"chat_template": bool(cfg.chat_template), "max_prompt_tokens": cfg.max_prompt_tokens,
                            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                            "top_p": cfg.top_p, "policy": cfg.name_or_path, **(metadata or {})}
    adapter = hasattr(policy.model, "peft_config")
    meta["adapter"] = adapter
    base = _loadable_base(policy) if adapter else None
    if adapter and base is None and base_dir is not None:
        base = str(save_base_model(policy, base_dir))
    peft_cfg = policy.model.peft_config["default"] if adapter else None
    previous = peft_cfg.base_model_name_or_path if adapter else None
    with atomic_directory(directory) as tmp:
        if adapter:
            if base is None:  # inside the adapter directory, at its final path
                save_base_model(policy, tmp / "base_model")
                base = str(directory.resolve() / "base_model")
            meta["base_model"] = base
            peft_cfg.base_model_name_or_path = base
            try:
                with warnings.catch_warnings():  # peft looks for the base's config at its final path, not yet there
                    warnings.simplefilter("ignore")
                    policy.model.save_pretrained(tmp)
            finally:
                peft_cfg.base_model_name_or_path = previous
            if merge:
                merged = copy.deepcopy(policy.model).merge_and_unload()
                merged.save_pretrained(tmp / "merged")
                policy.tokenizer.save_pretrained(tmp / "merged")
        else:
            policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / POLICY_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(meta, merge and adapter), encoding="utf-8")
    return directory


def policy_metadata(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / POLICY_META
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{meta}: unreadable ({str(e).splitlines()[0]}); the policy directory is damaged") from None


def load_saved_policy(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, metadata) of a directory written by save_policy, any PEFT adapter directory, or any
    transformers causal-LM checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    try:
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        elif (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            raise UserError(f"{path} holds neither adapter_config.json (a PEFT adapter) nor config.json (a model); "
                            "pass a policy directory written by `oodpl meta-test` / `oodpl benchmark` (policies/...)")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the policy in {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer, policy_metadata(path)
