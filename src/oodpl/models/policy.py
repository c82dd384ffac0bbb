"""The policy pi_theta with its frozen reference pi_ref: a stock `AutoModelForCausalLM` with zero-initialised peft LoRA
adapters (so pi_theta0 = pi_ref, and pi_ref is the same network with adapters disabled).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from oodpl.config import PolicyConfig
from oodpl.runtime.checks import check_model_dir
from oodpl.errors import UserError
from oodpl.models.precision import check_positions, parse_dtype
from oodpl.models.sources import RANDOM_SMOLLM2, TINY, TINY_LLAMA, policy_source
from oodpl.models.tiny import tiny_policy_model, tiny_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """pi_theta (trainable part: LoRA adapters or all weights) and pi_ref (frozen)."""

    model: nn.Module  # peft-wrapped for LoRA
    tokenizer: object
    config: PolicyConfig
    ref_model: nn.Module | None = None  # only for full fine-tuning; with LoRA the reference is the adapter-less base
    trunk_layer: int | None = None  # first adapted decoder layer when adapters sit on the top layers only

    def trunk_rows(self, batch, chunk: int = 32) -> list[torch.Tensor] | None:
        """Per-row cached states entering the first adapted layer (oodpl.models.trunk), or None at full depth."""
        if self.trunk_layer is None:
            return None
        from oodpl.models.trunk import trunk_states

        return trunk_states(self.model, batch, self.trunk_layer, chunk)

    def with_trunk(self, batch, chunk: int = 32):
        """`batch` with its frozen trunk computed once and attached (unchanged at full depth)."""
        from oodpl.models.trunk import attach

        return attach(batch, self.trunk_rows(batch, chunk), self.trunk_layer)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """theta: the trainable tensors by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def theta_init(self) -> dict[str, torch.Tensor]:
        """theta_0 of every inner problem: the current trainable tensors, detached (pi_theta0 = pi_ref for LoRA)."""
        return {k: v.detach() for k, v in self.trainable_parameters().items()}

    def logprobs(self, batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """log pi_theta(y|x) per row of a SequenceBatch; with `params`, at those tensors instead of the module's."""
        from oodpl.models.sampling import policy_logprobs

        return policy_logprobs(self.model, batch, params=params)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """pi_ref as a module: the base network with adapters disabled (LoRA), or the frozen copy (full)."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    def reset_to_reference(self) -> None:
        """theta <- theta_init (LoRA B = 0; full: copy of the reference weights)."""
        with torch.no_grad():
            if self.ref_model is not None:
                self.model.load_state_dict(self.ref_model.state_dict())
            else:
                for n, p in self.trainable_parameters().items():
                    if "lora_B" in n:
                        p.zero_()


class PolicyAtInit:
    """One loaded policy handed to every stage that trains or scores it (the benchmark's per-seed policy, `oodpl
    select`'s): `get()` returns it with its trainable tensors restored to their values at load time (the seed's LoRA
    initialisation), so no stage sees what an earlier one trained, whatever their order. `loader` defers the load to
    the first `get()`."""

    def __init__(self, policy: "Policy | None" = None, loader=None):
        self._policy, self._loader = policy, loader
        self._init = None if policy is None else self._snapshot(policy)

    @staticmethod
    def _snapshot(policy: "Policy") -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in policy.trainable_parameters().items()}

    def get(self) -> "Policy":
        if self._policy is None:
            self._policy = self._loader()
            self._init = self._snapshot(self._policy)
        with torch.no_grad():
            for k, p in self._policy.trainable_parameters().items():
                p.copy_(self._init[k])
        return self._policy


def lora_config(cfg: PolicyConfig, targets: list[str], layers: list[int] | None = None):
    """The policy's peft.LoraConfig: policy.lora_* / use_dora, then policy.peft_config passed through. task_type
    CAUSAL_LM, so the saved adapter loads with AutoPeftModelForCausalLM. B starts at zero unless peft_config asks for
    another init (pi_theta0 == pi_ref needs B = 0)."""
    from peft import LoraConfig

    kwargs = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                  use_dora=cfg.use_dora, bias="none", init_lora_weights=True, layers_to_transform=layers,
                  task_type="CAUSAL_LM")
    extra = dict(cfg.peft_config or {})
    named = sorted(set(extra) & {"r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "task_type"})
    if named:
        raise UserError(f"policy.peft_config sets {', '.join(named)}, which have their own settings; use "
                        "policy.lora_r / lora_alpha / lora_target_modules / lora_dropout / use_dora instead")
    try:
        return LoraConfig(**{**kwargs, **extra})
    except (TypeError, ValueError) as e:
        raise UserError(f"policy.peft_config: peft.LoraConfig refuses it ({str(e).splitlines()[0]}); see "
                        "peft's LoraConfig for the accepted arguments") from None


def load_policy(cfg: PolicyConfig, seed: int = 0) -> Policy:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(cfg.dtype)
    if cfg.name_or_path in (TINY, TINY_LLAMA, RANDOM_SMOLLM2):
        tokenizer = tiny_tokenizer()
        arch = {TINY: "gpt2", TINY_LLAMA: "llama", RANDOM_SMOLLM2: "smollm2-135m"}[cfg.name_or_path]
        model = tiny_policy_model(tokenizer, seed, arch).to(dtype)
    else:
        from oodpl.runtime.progress import step

        with step(f"loading the policy {cfg.name_or_path}"):
            source = policy_source(cfg.name_or_path, cfg.gguf_file)
            if Path(source).is_dir():
                check_model_dir(source, "policy model", causal=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load policy model {cfg.name_or_path}: {str(e).splitlines()[0]}") from None
    check_positions(model, cfg.max_prompt_tokens + cfg.max_new_tokens,
                    f"policy.max_prompt_tokens + policy.max_new_tokens = {cfg.max_prompt_tokens} + "
                    f"{cfg.max_new_tokens}", "lower policy.max_new_tokens or policy.max_prompt_tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    from oodpl.models.chat import resolve_policy_template

    # the Policy carries the resolved setting (a bool): every encoder reads policy.config.chat_template
    cfg = dataclasses.replace(cfg, chat_template=resolve_policy_template(cfg.chat_template, tokenizer,
                                                                         cfg.name_or_path))
    for p in model.parameters():
        p.requires_grad_(False)
    ref_model = None
    trunk_layer, layers = None, None
    if cfg.trainable_layers:
        from oodpl.models.trunk import num_layers

        if cfg.trainable != "lora":
            raise UserError("policy.trainable_layers needs policy.trainable: lora (the frozen trunk caches the layers "
                            "below the adapters); set policy.trainable_layers to null for full fine-tuning")
        n_layers = num_layers(model)
        if cfg.trainable_layers < n_layers:
            trunk_layer = n_layers - cfg.trainable_layers
            layers = list(range(trunk_layer, n_layers))
    if cfg.trainable == "lora":
        from peft import get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in cfg.lora_target_modules if t in present]
        if not targets:
            raise UserError(
                f"policy.lora_target_modules {cfg.lora_target_modules} match no module of {cfg.name_or_path}; "
                f"pick from {sorted(m for m in present if 'proj' in m or 'attn' in m)[:12]}"
            )
        lcfg = lora_config(cfg, targets, layers)
        torch.manual_seed(seed)
        model = get_peft_model(model, lcfg)  # B = 0: pi_theta0 == pi_ref exactly
    else:
        import copy

        ref_model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:  # active only inside sampling.policy_logprobs' first-order passes
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        from oodpl.models.sampling import checkpoint_contexts

        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                          "context_fn": checkpoint_contexts})
        # transformers also hooks the embeddings to make their output require grad (for reentrant checkpointing
        # of adapters); non-reentrant checkpointing does not need it, and torch.func.jvp refuses it
        if hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()
        model.oodpl_checkpointing = True
    model.eval()  # no dropout: the inner problem is deterministic given its samples
    return Policy(model=model, tokenizer=tokenizer, config=cfg, ref_model=ref_model, trunk_layer=trunk_layer)
