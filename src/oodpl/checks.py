"""Start-up checks on inputs that are cheap to verify before any work (and before an output directory is claimed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError


def check_reward_model_dir(path: str | os.PathLike) -> None:
    """A trained reward model directory: a `*ForSequenceClassification` model with one label.

    A causal LM, a plain backbone or a multi-label classifier would load with a freshly initialised (or wrong) head and
    give meaningless scores, so each is refused with a UserError that names what was found."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file() and (path / "adapter_config.json").is_file():
        check_reward_adapter_dir(path)
        return
    if not config.is_file():
        inside = sorted(p.name for p in path.iterdir())[:6] if path.is_dir() else []
        found = f"it holds {', '.join(inside)}" if inside else "it is empty"
        raise UserError(f"reward model {path} has no config.json ({found}); pass a directory written by `oodpl "
                        "meta-train` / `oodpl train-rm` (its reward_model/), another Hugging Face "
                        "sequence-classification checkpoint, or a PEFT adapter of one (adapter_config.json)")
    cfg = _json_object(config, "model config", "checkpoint")
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        found = ", ".join(map(str, archs)) or f"no architectures (model_type {cfg.get('model_type', '?')})"
        raise UserError(f"reward model {path} is a {found}, not a sequence-classification model with one output; "
                        "pass a trained reward model (the reward_model/ directory of a meta-train or train-rm run)")
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2  # transformers' default is 2 labels
    if labels != 1:
        raise UserError(f"reward model {path} is a classifier with {labels} labels; a reward model has exactly one "
                        "output (num_labels 1)")


def check_reward_adapter_dir(path: Path) -> None:
    """A PEFT adapter of a reward model (TRL's `RewardTrainer(peft_config=...)` output): task_type SEQ_CLS and a base
    model that exists where it is a local path (a hub id is looked up when the model loads)."""
    config = path / "adapter_config.json"
    cfg = _json_object(config, "adapter config", "adapter")
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


def _json_object(path: Path, what: str, whole: str) -> dict:
    """A JSON object file of a model directory; unreadable or not an object is a UserError saying it is damaged."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable {what} ({str(e).splitlines()[0]}); the {whole} is damaged") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: a {what} must be a JSON object; the {whole} is damaged")
    return value
