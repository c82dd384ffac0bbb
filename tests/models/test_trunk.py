"""Frozen trunk (policy.trainable_layers): the cached path equals the uncached one, values, gradients, JVPs and the
hypergradient itself; the cache is really used; unsupported set-ups are refused."""

import copy
import dataclasses

import pytest
import torch

from conftest import PAIRS, PROMPTS
from oodpl.core.bilevel import DomainTask, PreferenceSet, logprob_jvp, meta_gradient
from oodpl.config import MetaConfig, PolicyConfig, RewardConfig, RLOOConfig
from oodpl.errors import UserError
from oodpl.models.policy import load_policy
from oodpl.models.reward import load_reward_model
from oodpl.models.sampling import SampleBank, build_bank
from oodpl.models.trunk import decoder_layers

RLOO = RLOOConfig(beta=0.1, num_samples=3, importance_clip=None)


def _policy(name="tiny-random", dtype="float64", layers=1, **kw):
    cfg = PolicyConfig(name_or_path=name, dtype=dtype, max_new_tokens=6, max_prompt_tokens=16, lora_r=2, lora_alpha=4,
                       trainable_layers=layers, **kw)
    return load_policy(cfg, seed=0)


def _random_theta(policy, seed=1):
    """theta away from 0 (lora_B = 0 at init would hide most of the gradient through the adapters)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in policy.theta_init().items()}


def _uncached(batch):
    return dataclasses.replace(batch, trunk=None, trunk_layer=None)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    policy = _policy()
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", dtype="float64", max_length=64), seed=0)
    bank = build_bank(policy, PROMPTS, n=3, seed=0)
    return policy, rm, bank


def test_adapters_only_on_top_layers(setup):
    policy, _, bank = setup
    assert policy.trunk_layer == 1
    assert all(".h.1." in k for k in policy.trainable_parameters())
    assert bank.trunk is not None and len(bank.trunk) == len(PROMPTS) * 3
    full = _policy(layers=None)
    assert full.trunk_layer is None and any(".h.0." in k for k in full.trainable_parameters())
    assert _policy(layers=2).trunk_layer is None  # L >= depth: every layer, no trunk
    assert _policy(layers=0).trunk_layer is None


def test_cached_equals_uncached_logprobs_gradients_jvps(setup):
    policy, rm, bank = setup
    # a subset of rows re-collated with different padding than the batch the trunk was computed on
    batch = bank.select([4, 1], policy.tokenizer.pad_token_id).batch
    assert batch.trunk is not None and batch.trunk_layer == 1
    plain = _uncached(batch)
    theta = {k: v.requires_grad_() for k, v in _random_theta(policy).items()}
    a, b = policy.logprobs(batch, params=theta), policy.logprobs(plain, params=theta)
    assert _rel(a, b) < 1e-10
    w = torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(3))
    ga = torch.autograd.grad((a * w).sum(), list(theta.values()))
    gb = torch.autograd.grad((b * w).sum(), list(theta.values()))
    for x, y in zip(ga, gb):
        assert y.norm() > 0 and _rel(x, y) < 1e-10
    tangent = _random_theta(policy, seed=2)
    for method in ("forward", "double-backward"):
        la, sa = logprob_jvp(policy, batch, theta, tangent, method)
        lb, sb = logprob_jvp(policy, plain, theta, tangent, method)
        assert _rel(la, lb) < 1e-10 and sb.norm() > 0 and _rel(sa, sb) < 1e-10


def test_cache_is_really_used(setup):
    """Changing a layer below the adapters after caching changes the uncached log-probs only."""
    policy, _, bank = setup
    batch = bank.select([0, 2], policy.tokenizer.pad_token_id).batch
    before = policy.logprobs(batch).detach()
    lower = decoder_layers(policy.model)[0]
    saved = copy.deepcopy(lower.state_dict())
    try:
        with torch.no_grad():
            for p in lower.parameters():
                p.add_(0.5)
        assert torch.equal(policy.logprobs(batch).detach(), before)
        assert not torch.allclose(policy.logprobs(_uncached(batch)).detach(), before)
    finally:
        lower.load_state_dict(saved)


def _tasks(policy, rm, bank, K, drop_trunk):
    p, c, r = (list(x) for x in zip(*PAIRS))
    pset = PreferenceSet.build(policy, p, c, r)
    assert pset.trunk_chosen is not None
    pad = policy.tokenizer.pad_token_id
    tasks = []
    for d in range(2):
        inner = [bank.select([(d + 2 * k + i) % len(PROMPTS) for i in range(2)], pad, rm) for k in range(K)]
        query = pset.select(list(range(len(pset))), pad, rm)
        if drop_trunk:
            for s in inner:
                s.batch = _uncached(s.batch)
            query.batch = _uncached(query.batch)
        tasks.append(DomainTask(f"d{d}", inner, query))
    return tasks


@pytest.mark.parametrize("K,mode", [(1, "one-step"), (2, "truncated"), (2, "unrolled")])
def test_meta_gradient_cached_equals_uncached(setup, K, mode):
    policy, rm, bank = setup
    meta = MetaConfig(inner_steps=K, inner_lr=20.0, hypergrad=mode, lambda_bt=0.0)
    grads = []
    for drop in (False, True):
        rm.model.zero_grad()
        out = meta_gradient(policy, rm, _tasks(policy, rm, bank, K, drop), meta, RLOO)
        grads.append((torch.cat([p.grad.flatten() for p in rm.model.parameters()]), out["outer_loss"]))
    (g_cached, l_cached), (g_plain, l_plain) = grads
    assert g_plain.norm() > 0
    assert _rel(g_cached, g_plain) < 1e-10
    assert abs(l_cached - l_plain) <= 1e-12 * abs(l_plain)


def test_bank_saves_without_trunk_and_reattaches(setup, tmp_path):
    policy, rm, bank = setup
    bank.save(tmp_path / "b.pt")
    loaded = SampleBank.load(tmp_path / "b.pt")
    assert loaded.trunk is None
    loaded.for_policy(policy)
    pad = policy.tokenizer.pad_token_id
    a, b = loaded.select([3, 5], pad).batch, bank.select([3, 5], pad).batch
    assert torch.equal(a.trunk, b.trunk)
    assert torch.equal(loaded.ref_logp, bank.ref_logp)


def test_tiny_llama_cached_equals_uncached():
    """SmolLM2 (the default policy) is a Llama: the same equality in float32 on a tiny random Llama."""
    torch.manual_seed(0)
    policy = _policy("tiny-random-llama", "float32", layers=1)
    assert policy.trunk_layer == 2 and all(".layers.2." in k for k in policy.trainable_parameters())
    bank = build_bank(policy, PROMPTS[:4], n=2, seed=0)
    batch = bank.select([2, 0, 3], policy.tokenizer.pad_token_id).batch
    theta = {k: v.requires_grad_() for k, v in _random_theta(policy).items()}
    a, b = policy.logprobs(batch, params=theta), policy.logprobs(_uncached(batch), params=theta)
    assert _rel(a, b) < 1e-5
    for x, y in zip(torch.autograd.grad(a.sum(), list(theta.values())),
                    torch.autograd.grad(b.sum(), list(theta.values()))):
        assert y.norm() > 0 and _rel(x, y) < 1e-5
    tangent = _random_theta(policy, seed=2)
    _, sa = logprob_jvp(policy, batch, theta, tangent)
    _, sb = logprob_jvp(policy, _uncached(batch), theta, tangent)
    assert _rel(sa, sb) < 1e-5


def test_refused_setups():
    with pytest.raises(UserError, match="trainable: lora"):
        _policy(layers=1, trainable="full")
    with pytest.raises(UserError, match="not supported"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_dpo_loss_and_gradient_cached_equal_uncached(setup):
    """The dpo baseline reads the pairs' frozen trunk (computed once with log pi_ref) instead of running the whole
    network every step: same loss and gradient as the uncached path."""
    from oodpl.data.records import PairRecord
    from oodpl.train.dpo import batch_dpo_loss, build_preference_set

    policy, _, _ = setup
    pset = build_preference_set(policy, [PairRecord("d", p, c, r) for p, c, r in PAIRS])
    assert pset.trunk_chosen is not None
    plain = dataclasses.replace(pset, trunk_chosen=None, trunk_rejected=None, trunk_layer=None)
    params = policy.trainable_parameters()
    saved = {k: v.detach().clone() for k, v in params.items()}
    try:
        with torch.no_grad():
            for k, v in _random_theta(policy).items():
                params[k].copy_(v)
        idx = list(range(len(pset)))
        out = []
        for ps in (pset, plain):
            loss = batch_dpo_loss(policy, ps, idx, beta=0.5)
            out.append((loss.detach(), torch.autograd.grad(loss, list(params.values()))))
        assert abs(float(out[0][0] - out[1][0])) < 1e-10 * abs(float(out[1][0]))
        for x, y in zip(out[0][1], out[1][1]):
            assert y.norm() > 0 and _rel(x, y) < 1e-10
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
