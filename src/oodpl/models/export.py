"""The aligned policy as a standard artefact, and back.

`save_policy` writes a PEFT adapter directory (adapter_config.json with task_type CAUSAL_LM +
adapter_model.safetensors + the tokenizer), whose adapter_config.json records a base model that resolves elsewhere:

- an oodpl alias (the default SmolLM2-135M-Instruct): the hub id of the model its package's GGUF quantises
  (`models.POLICY_HUB_IDS`), so that `AutoPeftModelForCausalLM.from_pretrained("<run>/policies/<domain>/beta_0.1")`
  works with peft alone on any online machine (with the hub's unquantised weights), and `oodpl generate` /
  `load_saved_policy` resolve it through the alias' package to the exact weights it was trained on;
- a hub id: itself; a local model directory: its absolute path;
- a base that exists only in code (the tiny test models) or as a GGUF file given by path: saved once as a plain
  checkpoint in the run (`base_dir`, default `<run>/policies/base_model`); its absolute path is recorded, and
  `oodpl_policy.json` adds where it lies relative to the adapter (`base_model_relative`), so that a moved or copied
  run still loads: `load_saved_policy`, or with plain peft
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("<run>/policies/base_model"), adapter_dir)`.

`merge=True` also writes `<directory>/merged/`, the full model with the adapters folded in (plain transformers).
A fully fine-tuned policy (policy.trainable: full) is saved as a full model. `oodpl_policy.json` beside it records
how prompts are rendered (chat template, prompt/response token budgets) for `oodpl generate`.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from oodpl.errors import UserError, atomic_directory
from oodpl.models.policy import Policy


POLICY_META = "oodpl_policy.json"


def portable_base(policy: Policy) -> str | None:
    return portable_base_name(policy.config)


def portable_base_name(cfg) -> str | None:
    """The base model's name (of a PolicyConfig) as from_pretrained resolves it elsewhere, or None when there is none (a base that
    exists only in code, or a GGUF file given by path: save_policy then saves it into the run).

    An oodpl alias is recorded as the hub id of the model its package ships (policy_hub_id: plain peft online loads
    the original weights; oodpl's own loader resolves it through the alias' package, the exact weights trained on);
    a hub id stays a hub id; a local model directory is recorded as its absolute path (it is the user's)."""
    from oodpl.models.sources import POLICY_HUB_IDS, TINY, TINY_LLAMA, RANDOM_SMOLLM2

    name = cfg.name_or_path
    if name in POLICY_HUB_IDS:
        return POLICY_HUB_IDS[name]
    if name in (TINY, TINY_LLAMA, RANDOM_SMOLLM2) or name.endswith(".gguf") or cfg.gguf_file:
        return None
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return str(p.resolve())
    return None if p.exists() else name  # a hub id


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
    base = portable_base(policy) if adapter else None
    if adapter and base is None and base_dir is not None:
        base = str(save_base_model(policy, base_dir))
    peft_cfg = policy.model.peft_config["default"] if adapter else None
    previous = peft_cfg.base_model_name_or_path if adapter else None
    with atomic_directory(directory) as tmp:
        if adapter:
            if base is None:  # inside the adapter directory, at its final path
                save_base_model(policy, tmp / "base_model")
                base = str(directory.resolve() / "base_model")
            if Path(base).is_absolute():  # saved in the run: where it lies relative to the adapter, for moved runs
                meta["base_model_relative"] = os.path.relpath(base, directory.resolve())
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
    meta = policy_metadata(path)
    try:
        if (path / "adapter_config.json").is_file():
            base = _resolved_base(path, meta)
            if base is None:
                from peft import AutoPeftModelForCausalLM

                model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            else:
                from peft import PeftModel

                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(path))
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
    return model.eval(), tokenizer, meta


def _resolved_base(adapter: Path, meta: dict[str, Any]) -> str | None:
    """Where oodpl finds an adapter's base model, or None to let peft read adapter_config.json: an oodpl alias through
    its model package (the exact weights it was trained on); a base saved in the run where it now lies relative to
    the adapter (a moved or copied run directory)."""
    from oodpl.models.sources import POLICY_HUB_IDS, policy_source

    if meta.get("policy") in POLICY_HUB_IDS:
        return policy_source(meta["policy"])
    relative = meta.get("base_model_relative")
    if relative and (adapter / relative / "config.json").is_file():
        return str((adapter / relative).resolve())
    return None
