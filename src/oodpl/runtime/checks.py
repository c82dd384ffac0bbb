"""Start-up checks on inputs that are cheap to verify before any work (and before an output directory is claimed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from oodpl.errors import UserError


RM_HINT = ("pass a directory written by `oodpl meta-train` / `oodpl train-rm` (its reward_model/) or another Hugging "
           "Face sequence-classification checkpoint, or a PEFT adapter of one (adapter_config.json)")
POLICY_HINT = ("pass a policy directory written by `oodpl meta-test` / `oodpl benchmark` (policies/<domain>/beta_*), a "
               "PEFT adapter or a causal-LM model directory")
DAMAGED = "the file is damaged or incomplete: write it again (rerun the stage that made it)"
# files that make a tokenizer loadable (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
CAUSAL_ARCHS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
MAX_HEADER = 100 << 20  # a safetensors header larger than this is not a header


def _listing(path: Path) -> str:
    inside = sorted(p.name for p in path.iterdir())[:6] if path.is_dir() else []
    return f"it holds {', '.join(inside)}" if inside else "it is empty"


def read_json_object(path: Path, what: str) -> dict:
    """A small JSON file of a model directory (config.json, adapter_config.json) as a dict, or one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: unreadable {what} ({(str(e).splitlines() or [type(e).__name__])[0][:120]}); "
                        f"{DAMAGED}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} must be a JSON object; {DAMAGED}")
    return data


def check_safetensors(path: Path) -> None:
    """The header of a .safetensors file parses and describes exactly the file's size (a truncated, empty or
    garbage file is refused before a loader reports it as a SafetensorError traceback)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(size - 8, MAX_HEADER):
            raise UserError(f"{path}: not a complete safetensors file ({size} bytes, "
                            f"{'no header' if n < 0 else f'its header claims {n} bytes'}); {DAMAGED}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise UserError(f"{path}: the safetensors header is not valid JSON describing tensors; {DAMAGED}") from None
    if 8 + n + end != size:
        raise UserError(f"{path}: {size} bytes but its header describes {8 + n + end}; {DAMAGED}")


def check_weights(path: Path, what: str, stem: str = "model") -> None:
    """The weights of a model directory are present and, as safetensors, complete (every shard of an index)."""
    single, index = path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json"
    if single.is_file():
        check_safetensors(single)
    elif index.is_file():
        shards = read_json_object(index, "safetensors index").get("weight_map") or {}
        for shard in sorted(set(map(str, shards.values()))):
            if not (path / shard).is_file():
                raise UserError(f"{what} {path}: shard {shard} named by {index.name} is missing; {DAMAGED}")
            check_safetensors(path / shard)
    elif not any((path / f"{stem}{suffix}").is_file() for suffix in (".bin", ".pt", ".pth")):
        raise UserError(f"{what} {path} has no weights ({stem}.safetensors or {stem}.bin; {_listing(path)}); "
                        f"{RM_HINT if 'reward' in what else POLICY_HINT}")


def check_tokenizer(path: Path, what: str) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{what} {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}; {_listing(path)}); "
                        "save the tokenizer beside the model (tokenizer.save_pretrained)")


def check_model_dir(path: str | os.PathLike, what: str, causal: bool = False) -> dict:
    """A local model directory is complete before anything loads it: config.json, the weights (safetensors headers
    and sizes), a tokenizer; `causal`: the model is a causal LM (a reward model is refused as a policy). Returns the
    config."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        hint = RM_HINT if "reward" in what else POLICY_HINT
        raise UserError(f"{what} {path} has no config.json ({_listing(path)}); {hint}")
    cfg = read_json_object(config, "model config")
    archs = [str(a) for a in cfg.get("architectures") or []]
    if causal and archs and not any(a.endswith(CAUSAL_ARCHS) for a in archs):
        raise UserError(f"{what} {path} is a {', '.join(archs)}, not a causal language model"
                        f"{' (a reward model)' if any(a.endswith('ForSequenceClassification') for a in archs) else ''}"
                        f"; {POLICY_HINT}")
    check_weights(path, what)
    check_tokenizer(path, what)
    return cfg


def check_policy_dir(path: str | os.PathLike) -> None:
    """A --policy directory: a PEFT adapter (adapter_config.json, complete adapter weights, a tokenizer, a base model
    that is there) or a causal-LM model directory; anything else is one line naming what was found."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if not adapter.is_file():
        if not (path / "config.json").is_file():
            raise UserError(f"policy {path} holds neither adapter_config.json (a PEFT adapter) nor config.json (a "
                            f"model) ({_listing(path)}); {POLICY_HINT}")
        check_model_dir(path, "policy", causal=True)
        return
    acfg = read_json_object(adapter, "adapter config")
    if not acfg.get("peft_type"):
        raise UserError(f"{adapter}: no peft_type; not a PEFT adapter config, {DAMAGED}")
    check_weights(path, "policy adapter", stem="adapter_model")
    check_tokenizer(path, "policy")
    base = str(acfg.get("base_model_name_or_path") or "")
    if base.startswith(("/", ".", "~")):
        if not Path(base).expanduser().is_dir():
            raise UserError(f"{adapter}: its base model {base} does not exist; move the run back, or edit "
                            "base_model_name_or_path to where the base model is now")
        check_model_dir(Path(base).expanduser(), "base model of the adapter", causal=True)


def check_reward_model_dir(path: str | os.PathLike) -> None:
    """A trained reward model directory: a `*ForSequenceClassification` model with one label, complete weights and
    a tokenizer.

    A causal LM, a plain backbone or a multi-label classifier would load with a freshly initialised (or wrong) head and
    give meaningless scores, so each is refused with a UserError that names what was found."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file() and (path / "adapter_config.json").is_file():
        check_reward_adapter_dir(path)
        return
    if not config.is_file():
        raise UserError(f"reward model {path} has no config.json ({_listing(path)}); {RM_HINT}")
    cfg = read_json_object(config, "model config")
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        found = ", ".join(map(str, archs)) or f"no architectures (model_type {cfg.get('model_type', '?')})"
        raise UserError(f"reward model {path} is a {found}, not a sequence-classification model with one output; "
                        "pass a trained reward model (the reward_model/ directory of a meta-train or train-rm run)")
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2  # transformers' default is 2 labels
    if labels != 1:
        raise UserError(f"reward model {path} is a classifier with {labels} labels; a reward model has exactly one "
                        "output (num_labels 1)")
    check_model_dir(path, "reward model")


def check_reward_adapter_dir(path: Path) -> None:
    """A PEFT adapter of a reward model (TRL's `RewardTrainer(peft_config=...)` output): task_type SEQ_CLS and a base
    model that exists where it is a local path (a hub id is looked up when the model loads)."""
    config = path / "adapter_config.json"
    cfg = read_json_object(config, "adapter config")
    task = cfg.get("task_type")
    if task != "SEQ_CLS":
        raise UserError(f"reward model {path} is a PEFT adapter with task_type {task}, not SEQ_CLS (a sequence "
                        "classifier); pass a reward model's adapter (TRL's RewardTrainer with a peft_config writes one)")
    base = str(cfg.get("base_model_name_or_path") or "")
    if not base:
        raise UserError(f"{config}: no base_model_name_or_path; the adapter does not say which model it adapts")
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise UserError(f"reward model {path}: its base model {base} (adapter_config.json base_model_name_or_path) "
                        "does not exist; restore it, or edit base_model_name_or_path to where the base model lies")

