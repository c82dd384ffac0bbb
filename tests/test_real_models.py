"""Opt-in checks on the real default models (SmolLM2-135M-Instruct + all-MiniLM-L6-v2): `pytest -m slow`."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_default_models_load_and_pi_theta0_equals_pi_ref():
    from oodpl.config import PolicyConfig, RewardConfig
    from oodpl.models import load_policy, load_reward_model
    from oodpl.sampling import build_bank

    policy = load_policy(PolicyConfig(max_new_tokens=6))
    rm = load_reward_model(RewardConfig())
    bank = build_bank(policy, ["The movie was", "My flight"], n=2, seed=0)
    s = bank.select([0, 1], policy.tokenizer.pad_token_id, rm)
    with torch.no_grad():
        logp = policy.logprobs(s.batch)  # adapters on, B = 0
    assert torch.allclose(logp, s.ref_logp, atol=1e-4)
    assert torch.isfinite(rm.forward_encoded(s.rm_encoding)).all()


def test_meta_train_one_step_on_default_models(tmp_path):
    from oodpl.cli import main

    out = tmp_path / "run"
    code = main(["--quiet", "meta-train", "-o", str(out), "--set", "meta.outer_steps=1", "--set", "data.max_domains=2",
                 "--set", "data.support_size=2", "--set", "data.query_size=4", "--set", "rloo.batch_prompts=2",
                 "--set", "rloo.num_samples=2", "--set", "policy.max_new_tokens=6", "--set", "meta.query_batch=4",
                 "--set", "report_to=[none]"])
    assert code == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["hypergrad_norm"] > 0 and (out / "reward_model" / "model.safetensors").exists()
