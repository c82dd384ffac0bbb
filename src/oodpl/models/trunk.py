"""Frozen trunk (method.md, Performance): with adapters only on the top L decoder layers, the hidden states entering the
first adapted layer depend on the token sequence alone. For fixed sequences (bank samples, human pairs) they are
computed once, without gradient, and every later log-probability of those rows runs only the top L layers, the final
norm and the LM head.

How the top layers are run: the model's own forward is called unchanged (same parameter names, so
torch.func.functional_call with the adapters' parameter dict still binds), with the lower decoder layers made
pass-through for the duration of the call and a forward pre-hook on the first adapted layer that swaps the incoming
hidden states for the cached ones. The embeddings, attention mask and rotary tables are still built by the model (cheap,
and exactly as in the uncached forward).

Per row, only the states of the row's real (non-pad) positions are kept; `pad_rows` re-pads them when rows are
collated into a batch. Left padding with position ids from the attention mask makes a row's states independent of its
padding, so re-padded cached states equal the uncached ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from oodpl.errors import UserError

# decoder-layer lists of the architectures whose forward calls each layer as layer(hidden_states, ...) -> hidden_states
_LAYER_LISTS = ("model.layers", "transformer.h")


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers; UserError for an architecture whose layers we cannot run from a cache."""
    base = _base(model)
    for path in _LAYER_LISTS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    raise UserError(
        f"policy.trainable_layers is set, but the frozen trunk is not supported for {type(base).__name__} (supported: "
        "Llama-style models with model.layers, e.g. SmolLM2, Llama, Mistral, Qwen2, and GPT-2); set "
        "policy.trainable_layers to null to adapt every layer"
    )


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


class _Stop(Exception):
    """Raised by the capture hook: nothing above the trunk needs computing."""


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def _lower_layers_skipped(layers: nn.ModuleList, first: int) -> Iterator[None]:
    """Layers [0, first) return their input unchanged (an instance-level forward; parameter names stay as they are)."""
    for layer in layers[:first]:
        layer.forward = _pass_through
    try:
        yield
    finally:
        for layer in layers[:first]:
            del layer.forward


@contextmanager
def from_trunk(model: nn.Module, first: int, states: torch.Tensor) -> Iterator[None]:
    """Within the context, a forward of `model` on rows whose trunk is `states` [N, T, H] runs layers first.. only."""
    layers = decoder_layers(model)

    def inject(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:2] != states.shape[:2]:
            raise RuntimeError(f"cached trunk of shape {tuple(states.shape)} does not match the batch "
                               f"{tuple(hidden.shape)}")
        new = states.to(device=hidden.device, dtype=hidden.dtype)
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    handle = layers[first].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with _lower_layers_skipped(layers, first):
            yield
    finally:
        handle.remove()


@torch.no_grad()
def trunk_states(model: nn.Module, batch, first: int, chunk: int = 32) -> list[torch.Tensor]:
    """The hidden states entering decoder layer `first`, per row of a SequenceBatch, real positions only ([L_i, H]).

    Only layers below `first` run: the capture hook stops the forward when it reaches layer `first`."""
    layers = decoder_layers(model)
    dev = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    rows: list[torch.Tensor] = []
    handle = layers[first].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for i in range(0, len(batch), chunk):
            sl = slice(i, i + chunk)
            captured.clear()
            try:
                model(input_ids=batch.input_ids[sl].to(dev), attention_mask=batch.attention_mask[sl].to(dev),
                      position_ids=batch.position_ids[sl].to(dev), use_cache=False)
            except _Stop:
                pass
            states = captured[0]
            lengths = batch.attention_mask[sl].sum(-1).tolist()
            T = states.shape[1]
            rows.extend(states[j, T - int(n):].clone() for j, n in enumerate(lengths))
    finally:
        handle.remove()
    return rows


def pad_rows(rows: list[torch.Tensor], T: int) -> torch.Tensor:
    """Left-pad per-row states [L_i, H] to [N, T, H] (zeros at pad positions, which attention masks out)."""
    H = rows[0].shape[-1]
    out = rows[0].new_zeros((len(rows), T, H))
    for i, r in enumerate(rows):
        if len(r):
            out[i, T - len(r):] = r
    return out


def attach(batch, rows: list[torch.Tensor] | None, first: int | None):
    """`batch` with its cached trunk set from per-row states (no-op without a trunk)."""
    if rows is None or first is None:
        return batch
    if len(rows) != len(batch):
        raise RuntimeError(f"{len(rows)} cached trunk rows for a batch of {len(batch)}")
    batch.trunk = pad_rows(rows, batch.input_ids.shape[1])
    batch.trunk_layer = first
    return batch


def rows_of(batch) -> list[torch.Tensor]:
    """The per-row states (real positions only) of a batch that carries a trunk: the inverse of `attach`."""
    T = batch.trunk.shape[1]
    return [batch.trunk[i, T - int(n):] for i, n in enumerate(batch.attention_mask.sum(-1).tolist())]
