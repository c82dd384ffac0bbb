"""Shared fixtures: tiny random policy / reward model in float64 and a small bilevel problem built on them."""

from __future__ import annotations

import os

import pytest
import torch

from oodpl.bilevel import DemonstrationSet, DomainTask, make_preference_batch
from oodpl.config import PolicyConfig, RewardConfig
from oodpl.models import load_policy, load_reward_model
from oodpl.sampling import build_bank

PROMPTS = ["the film was", "my order came", "service here is", "i think that", "the plot felt", "overall it"]
# the prompts' human continuations: the demonstrations of meta.inner_candidates=samples+demos
REFERENCES = ["a quiet gem", "late but fine", "friendly enough", "we should go", "slow at first", "worth it"]
PAIRS = [
    ("the film was", "truly wonderful and fun", "dull and a waste"),
    ("my order came", "early and well packed", "broken, never again"),
    ("service here is", "kind and quick", "rude and slow"),
]


def tiny_models(dtype: str = "float64", seed: int = 0, trainable: str = "lora"):
    pcfg = PolicyConfig(name_or_path="tiny-random", dtype=dtype, max_new_tokens=6, max_prompt_tokens=16,
                        trainable=trainable, lora_r=2, lora_alpha=4)
    policy = load_policy(pcfg, seed=seed)
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", dtype=dtype, max_length=64), seed=seed)
    return policy, rm


def tiny_tasks(policy, rm, K: int = 1, n: int = 3, B: int = 2, domains: int = 2, seed: int = 0,
               demos: bool = False):
    """Meta-batch of `domains` tasks with K inner sample batches each, drawn from a bank of pi_ref samples; with
    `demos`, each inner batch's prompts' REFERENCES as its demonstrations (meta.inner_candidates=samples+demos)."""
    bank = build_bank(policy, PROMPTS, n=n, seed=seed)
    demo_set = DemonstrationSet.build(policy, PROMPTS, REFERENCES) if demos else None
    pad = policy.tokenizer.pad_token_id
    tasks = []
    for d in range(domains):
        batches = [[(d + 2 * k + i) % len(PROMPTS) for i in range(B)] for k in range(K)]
        p, c, r = zip(*PAIRS)
        tasks.append(DomainTask(f"d{d}", [bank.select(b, pad, rm) for b in batches],
                                make_preference_batch(policy, rm, list(p), list(c), list(r)),
                                [demo_set.select(b, pad, rm) for b in batches] if demos else None))
    return tasks


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny matrices: one BLAS thread is much faster than two (and than two fighting over a shared CPU)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses some tests start
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny64():
    torch.manual_seed(0)
    return tiny_models("float64")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (scripts/gpu_smoke.sh runs them); skipped without one")
