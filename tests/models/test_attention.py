"""Attention kernels and gradient checkpointing: fused SDPA kernels everywhere except the passes that need forward-mode
AD or a double backward; policy.gradient_checkpointing changes memory, never values."""

import pytest
import torch

from conftest import PROMPTS
from oodpl.core.bilevel import logprob_jvp
from oodpl.config import PolicyConfig
from oodpl.models.policy import load_policy
from oodpl.models.sampling import build_bank


def _policy(checkpointing=False):
    cfg = PolicyConfig(name_or_path="tiny-random", dtype="float64", max_new_tokens=6, max_prompt_tokens=16, lora_r=2,
                       lora_alpha=4, gradient_checkpointing=checkpointing)
    return load_policy(cfg, seed=0)


def _theta(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: (0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)).requires_grad_()
            for k, v in policy.theta_init().items()}


@pytest.fixture(scope="module")
def batch():
    policy = _policy()
    return build_bank(policy, PROMPTS[:4], n=2, seed=0).select([0, 1, 2, 3], policy.tokenizer.pad_token_id).batch


def test_fused_kernels_except_second_order_passes(batch, monkeypatch):
    policy = _policy()
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch.backends.cuda.flash_sdp_enabled())  # False only under sdpa_kernel([MATH])
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    theta = _theta(policy)
    policy.logprobs(batch, params=theta).sum().backward()
    assert seen and all(seen)  # first-order: SDPA free to pick a fused kernel
    seen.clear()
    logprob_jvp(policy, batch, theta, _theta(policy, 2))
    assert seen and not any(seen)  # forward-mode JVP: math kernel (no fused kernel has a forward-mode formula)


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_gradient_checkpointing_same_values_less_saved(batch):
    plain, ckpt = _policy(False), _policy(True)
    theta_a, theta_b = _theta(plain), _theta(ckpt)
    a, saved_a = _saved_bytes(lambda: plain.logprobs(batch, params=theta_a))
    b, saved_b = _saved_bytes(lambda: ckpt.logprobs(batch, params=theta_b))
    assert torch.equal(a, b)
    assert saved_b < 0.7 * saved_a, (saved_a, saved_b)
    ga = torch.autograd.grad(a.sum(), list(theta_a.values()))
    gb = torch.autograd.grad(b.sum(), list(theta_b.values()))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)
    assert not any(m.training for m in ckpt.model.modules())  # eval mode restored after the pass
    for method in ("forward", "double-backward"):  # second-order passes: no checkpointing, same result
        la, sa = logprob_jvp(plain, batch, theta_a, _theta(plain, 2), method)
        lb, sb = logprob_jvp(ckpt, batch, theta_b, _theta(ckpt, 2), method)
        assert torch.allclose(sa, sb, rtol=1e-12, atol=1e-14)
