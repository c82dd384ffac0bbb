"""Processes and devices through accelerate: one process, DDP-style data parallelism (gloo / nccl) or DeepSpeed
ZeRO-1/2. Parameter sharding (FSDP, ZeRO-3) is refused: the bilevel step's Jacobian-vector products need every
process to hold the whole policy and reward model."""

from __future__ import annotations

import os

import torch

from oodpl.errors import UserError


def make_accelerator(cpu: bool | None = None):
    """An Accelerator for one process, DDP (gloo / nccl) or DeepSpeed ZeRO-1/2; parameter sharding is refused.

    The Jacobian-vector products of the bilevel step need every process to hold the whole policy and reward model:
    FSDP and ZeRO-3 shard parameters, ZeRO-1/2 only shard optimiser states and gradients, which is fine."""
    from accelerate import Accelerator

    forget_foreign_state()
    kind = os.environ.get("ACCELERATE_DISTRIBUTED_TYPE", "") or ""
    if kind.upper() in ("FSDP", "MEGATRON_LM") or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError("parameter sharding (FSDP) does not combine with the Jacobian-vector products of the bilevel "
                        "step; use DDP (configs/accelerate/multi_gpu_ddp.yaml) or DeepSpeed ZeRO-1/2 "
                        "(configs/accelerate/deepspeed_zero2.yaml)")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError:
            raise UserError("this launch asks for DeepSpeed, which is not installed; pip install 'oodpl[deepspeed]' "
                            "or launch with a DDP config (configs/accelerate/multi_gpu_ddp.yaml)") from None
        from accelerate.utils import InitProcessGroupKwargs

        # without CUDA accelerate picks no backend for DeepSpeed and every process believes it is alone: say gloo
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        acc = Accelerator(kwargs_handlers=handlers)
    else:
        acc = Accelerator(cpu=not torch.cuda.is_available() if cpu is None else cpu)
    if acc.state.distributed_type.name in ("FSDP", "MEGATRON_LM"):
        raise UserError(f"{acc.state.distributed_type.name} is not supported by the bilevel step; use DDP "
                        "(configs/accelerate/multi_gpu_ddp.yaml)")
    if uses_deepspeed(acc):
        plugin = acc.state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        if int(plugin.zero_stage or 0) >= 3:
            raise UserError("DeepSpeed ZeRO-3 shards the parameters that the Jacobian-vector products of the bilevel "
                            "step need whole; use ZeRO-1/2 (configs/accelerate/deepspeed_zero2.yaml) or DDP")
        for key in ("offload_optimizer", "offload_param"):
            if str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "auto"):
                raise UserError(f"DeepSpeed {key} is not supported by oodpl (untested with the bilevel step); remove "
                                f"it from the DeepSpeed config or use configs/accelerate/deepspeed_zero2.yaml")
    return acc


def forget_foreign_state() -> None:
    """accelerate keeps one AcceleratorState per process. A Trainer run earlier in the same process (TRL's configs
    default to bf16) leaves its mixed precision there, and every later Accelerator silently inherits it: a meta-train
    called in-process after a DPOTrainer ran in bf16 autocast. Reset it when it differs from what this launch asks."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    wanted = (os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if state and str(state.get("_mixed_precision") or "no").lower() != wanted:
        AcceleratorState._reset_state()  # keeps PartialState: the process group of a launch stays as it is


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.distributed_type.name == "DEEPSPEED"


def prepare_deepspeed(accelerator, model: torch.nn.Module, optimizer, grad_clip: float):
    """Wrap (model, optimizer) in a DeepSpeed ZeRO-1/2 engine. oodpl's config, not DeepSpeed's, sets what it governs:
    one backward per optimiser step (no batch size for DeepSpeed to split) and the gradient clipping."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
              train_batch_size=accelerator.num_processes, gradient_clipping=float(grad_clip or 0.0))
    return accelerator.prepare(model, optimizer)
