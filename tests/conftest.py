"""Shared fixtures: tiny random policy / reward model in float64 and a small bilevel problem built on them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from oodpl.core.bilevel import DemonstrationSet, DomainTask, make_preference_batch
from oodpl.config import PolicyConfig, RewardConfig
from oodpl.models.policy import load_policy
from oodpl.models.reward import load_reward_model
from oodpl.models.sampling import build_bank

# tests/<package>/ mirror src/oodpl/; a few test modules share helpers with another package's (e.g. tiny_args of
# train/test_metatrain.py), imported by module name, so every test folder is on the path whatever runs first
for _folder in sorted(Path(__file__).parent.iterdir()):
    if not _folder.is_dir() or _folder.name in ("fixtures", "__pycache__"):
        continue
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

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
