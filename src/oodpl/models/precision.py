"""Devices and precision: dtype names, autocast for a model's compute dtype, placement on an accelerator's
device, and position-limit checks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from oodpl.errors import UserError

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}") from None


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Rewards, log-probabilities, advantages, losses and KL are computed in float32 whatever the model's dtype
    (bfloat16 / float16 are upcast; float64 stays float64 for the finite-difference tests)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The mixed-precision compute dtype set on a model by `place` (None: run in the weights' dtype)."""
    return getattr(model, "oodpl_autocast", None)


def autocast(model: nn.Module, device: torch.device):
    """torch.autocast for the model's mixed-precision setting, or a no-op context."""
    from contextlib import nullcontext

    dt = autocast_dtype(model)
    return nullcontext() if dt is None else torch.autocast(device_type=device.type, dtype=dt)


def place(obj, accelerator=None, device: str | torch.device | None = None):
    """Put a Policy / RewardModel (or a bare module) on the accelerator's device, honouring its `mixed_precision`
    (bf16 / fp16 compute under torch.autocast for float32 weights; weights in bf16 / fp16 / fp64 are left as they are).
    Returns `obj`. Every command that runs a model calls this once after loading it."""
    device = torch.device(device if device is not None else accelerator.device if accelerator is not None else "cpu")
    modules = [getattr(obj, "model", obj)] + [m for m in [getattr(obj, "ref_model", None)] if m is not None]
    mp = getattr(accelerator, "mixed_precision", "no") if accelerator is not None else "no"
    mp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mp))
    for m in modules:
        m.to(device)
        weights = next(m.parameters()).dtype
        m.oodpl_autocast = mp_dtype if mp_dtype is not None and weights == torch.float32 else None
    return obj


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model's position embeddings cover (None: no limit recorded, e.g. rotary models
    without max_position_embeddings). RoBERTa-style models start positions after the padding index."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if any(t in str(getattr(config, "model_type", "")) for t in ("roberta", "camembert")):
                value -= (getattr(config, "pad_token_id", None) or 1) + 1
            return value
    return None


def check_positions(model: nn.Module, length: int, what: str, fix: str) -> None:
    """A token budget beyond the model's positions fails deep inside its forward (IndexError): refuse it up front."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        raise UserError(f"{what} tokens exceed the {limit} positions of the model {name}; {fix} (to at most "
                        f"{limit} in all)")
