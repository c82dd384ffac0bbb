"""Device correctness without a GPU: a torch function mode that knows which tensors would live on the HOST (CPU) if
the models ran on a CUDA device, and fails on any operation that mixes such a tensor with a device tensor.

Why this is sound. On a CUDA machine a tensor is on the host when it was made there: by a factory without a `device`
(torch.tensor, torch.zeros, ...: collate, tokenizers, judges), by torch.load of a CPU file, or by `.cpu()`; and an
operation's result is on the host when all its tensor inputs are. Everything else (model parameters after
`.to(device)`, tensors made with `device=`, results of operations on device tensors, and tensors made inside C++
such as autograd's gradients) is on the device. The mode tracks exactly the host tensors (a weak set, propagated
through every operation) and reports an operation that has a host tensor of one or more dimensions among its inputs
together with a device tensor: on CUDA that operation raises "Expected all tensors to be on the same device". The
few operations PyTorch allows across devices are exempt: `.to` / `.copy_` (transfers) and indexing a device tensor
with host indices. 0-dim host tensors mix freely, as on CUDA.

On the CPU, `.to(dev)` and `.cpu()` return the very same object, which would make host and device copies
indistinguishable; the mode therefore returns a copy for them (as CUDA would), except for model parameters, whose
identity must survive `Module.to` (they are marked as device in place). Limitation: a tensor moved with an explicit
`.to("cpu")` counts as moved to the model's device (in these tests the model device is the CPU).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye, torch.from_numpy, torch.randperm}
_TRANSFERS = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda, torch.Tensor.__setitem__}


class DeviceMixing(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host = WeakIdKeyDictionary()
        self.violations: list[str] = []

    def mark(self, out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.host[t] = True

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def _record(self, func, tensors):
        frames = [f for f in traceback.extract_stack()[:-3] if "/oodpl/" in f.filename or "/tests/" in f.filename]
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[::-1][:4])
        shapes = [(tuple(t.shape), "host" if self.is_host(t) else "device") for t in tensors]
        self.violations.append(f"{getattr(func, '__name__', func)} {shapes} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func is torch.Tensor.cpu:
            out = func(*args, **kwargs).clone()
            self.mark(out)
            return out
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            target = _target_device(args[1:], kwargs) if func is torch.Tensor.to else "device"
            out = func(*args, **kwargs)
            if target is None:  # a dtype change only: stays where it was
                if self.is_host(args[0]):
                    self.mark(out)
                return out
            if isinstance(target, torch.Tensor):
                if self.is_host(target):
                    self.mark(out)
                return out
            if self.is_host(args[0]) and out is args[0]:
                if isinstance(out, torch.nn.Parameter):
                    self.host.pop(out)  # a parameter keeps its identity through Module.to
                else:
                    out = out.clone()  # CUDA copies; keep the host original distinct
            return out
        if func in _FACTORIES:
            out = func(*args, **kwargs)
            if kwargs.get("device") is None:
                self.mark(out)
            return out
        host = [t for t in tensors if self.is_host(t)]
        device = [t for t in tensors if not self.is_host(t)]
        exempt = func in _TRANSFERS or (func is torch.Tensor.__getitem__ and not self.is_host(args[0]))
        if not exempt and device and any(t.dim() > 0 for t in host):
            self._record(func, tensors)
        out = func(*args, **kwargs)
        if tensors and not device and kwargs.get("device") is None:
            self.mark(out)
        return out


def _target_device(args, kwargs):
    """What `Tensor.to(*args, **kwargs)` moves to: a device-like, a tensor (its device), or None (dtype only)."""
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args:
        if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            return a
        if isinstance(a, torch.Tensor):
            return a
    return None


@pytest.fixture
def device_mode(monkeypatch):
    mode = DeviceMixing()
    real_load = torch.load

    def load(*a, **k):  # files are written from CPU tensors: what torch.load returns lives on the host
        out = real_load(*a, **k)
        tree_map(lambda t: mode.mark(t) if isinstance(t, torch.Tensor) else None, out)
        return out

    monkeypatch.setattr(torch, "load", load)
    return mode


def test_the_mode_catches_mixing_and_allows_transfers(device_mode):
    with device_mode:
        lin = torch.nn.Linear(3, 2)
        lin.to("cpu")  # placed on "the device"
        x = torch.randn(4, 3)  # host
        y = lin(x.to("cpu"))  # moved: fine
        bias = torch.ones(2)  # host
        _ = y + torch.tensor(1.0)  # 0-dim host scalar: fine on CUDA too
        _ = y[torch.tensor([0, 1])]  # host index into a device tensor: fine
        assert not device_mode.violations
        _ = y + bias  # host vector meets a device tensor: an error on CUDA
        assert len(device_mode.violations) == 1
        _ = y.detach().cpu() + bias  # both on the host: fine
        _ = lin(x)  # host input to a placed module: an error on CUDA
    assert len(device_mode.violations) >= 2, device_mode.violations


def test_meta_train_and_meta_test_keep_every_tensor_on_the_models_device(device_mode, tmp_path):
    from conftest import PROMPTS
    from oodpl.config import load_config
    from oodpl.adapt.metatest import optimise_policy, reward_model_fn
    from oodpl.train.metatrain import meta_train
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.precision import place

    cfg = load_config("configs/tiny.yaml", ["meta.outer_steps=2", "quiet=true"])
    with device_mode:
        meta_train(cfg, tmp_path / "run")
    assert not device_mode.violations, "\n".join(device_mode.violations[:10])
    mt_cfg = load_config("configs/tiny.yaml", ["rloo.reward_norm=none"])  # raw rewards: no reference scale needed
    for layers in (None, 1):  # full depth, and the frozen trunk shared by pi_theta and pi_ref
        pcfg = mt_cfg.policy
        pcfg.trainable_layers = layers
        with device_mode:
            policy = place(load_policy(pcfg), device="cpu")
            rm = place(load_reward_model(cfg.reward), device="cpu")
            optimise_policy(policy, PROMPTS, reward_model_fn(rm), mt_cfg, beta=0.1, seed=0)
        assert not device_mode.violations, "\n".join(device_mode.violations[:10])


def test_the_mode_catches_a_host_reference_logprob(device_mode):
    """Negative control on the real code path: a bank whose log pi_ref stayed on the host (the bug of issue 14) is
    reported as soon as it meets the policy's log-probabilities."""
    from conftest import PROMPTS
    from oodpl.config import PolicyConfig
    from oodpl.models.policy import load_policy
    from oodpl.models.precision import place
    from oodpl.core.policy_opt import policy_gradient
    from oodpl.models.sampling import build_bank

    with device_mode:
        policy = place(load_policy(PolicyConfig(name_or_path="tiny-random", max_new_tokens=4, lora_r=2)), device="cpu")
        bank = build_bank(policy, PROMPTS[:2], n=2, seed=0)
        assert not device_mode.violations, device_mode.violations
        bank.ref_logp = bank.ref_logp.cpu()
        s = bank.select([0, 1], policy.tokenizer.pad_token_id)
        policy_gradient(lambda th: policy.logprobs(s.batch), policy.trainable_parameters(), torch.zeros(4, device="cpu"),
                        s.ref_logp, None, 0.1, 2)
    assert any("host" in v for v in device_mode.violations)
