"""Opt-in checks on the real default models (SmolLM2-135M-Instruct + all-MiniLM-L6-v2): `pytest -m slow`."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_default_models_load_and_pi_theta0_equals_pi_ref():
    from oodpl.config import PolicyConfig, RewardConfig
    from oodpl.models.policy import load_policy
    from oodpl.models.reward import load_reward_model
    from oodpl.models.sampling import build_bank

    policy = load_policy(PolicyConfig(max_new_tokens=6))
    rm = load_reward_model(RewardConfig())
    bank = build_bank(policy, ["The movie was", "My flight"], n=2, seed=0)
    s = bank.select([0, 1], policy.tokenizer.pad_token_id, rm)
    with torch.no_grad():
        logp = policy.logprobs(s.batch)  # adapters on, B = 0
    assert torch.allclose(logp, s.ref_logp, atol=1e-4)
    assert torch.isfinite(rm.forward_encoded(s.rm_encoding)).all()


def test_meta_train_one_step_on_default_models(tmp_path):
    from oodpl.cli.main import main

    out = tmp_path / "run"
    code = main(["--quiet", "meta-train", "-o", str(out), "--set", "meta.outer_steps=1", "--set", "data.max_domains=2",
                 "--set", "data.support_size=2", "--set", "data.query_size=4", "--set", "rloo.batch_prompts=2",
                 "--set", "rloo.num_samples=2", "--set", "policy.max_new_tokens=6", "--set", "meta.query_batch=4",
                 "--set", "report_to=[none]"])
    assert code == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["hypergrad_norm"] > 0 and (out / "reward_model" / "model.safetensors").exists()


def test_train_rm_grm_on_smollm2_is_scored_by_transformers_as_by_oodpl(tmp_path):
    """issue 20's check: `oodpl train-rm --method grm` on the default data with the policy's architecture as the RM
    backbone writes a checkpoint that plain transformers loads and scores as oodpl does (|difference| < 1e-5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from oodpl.cli.main import main
    from oodpl.config import RewardConfig, load_config
    from oodpl.data.split import build_split
    from oodpl.models.reward import load_reward_checkpoint

    out = tmp_path / "grm"
    sets = ["reward.name_or_path=smollm2-135m-instruct", "train_rm.epochs=1", "train_rm.batch_size=4",
            "data.max_domains=2", "data.query_size=8", "report_to=[none]"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["--quiet", "train-rm", "--method", "grm", "-o", str(out), *args]) == 0
    ckpt = out / "reward_model"
    pairs = build_split(load_config(None, sets).data).pooled_pairs()
    prompts, responses = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    rm = load_reward_checkpoint(ckpt, RewardConfig())
    with torch.no_grad():
        ours = rm.score(prompts, responses)
        tok = AutoTokenizer.from_pretrained(ckpt)
        model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
        plain = torch.stack([model(**tok(p + r + tok.eos_token, return_tensors="pt", truncation=True,
                                        max_length=rm.max_length)).logits[0, 0] for p, r in zip(prompts, responses)])
    diff = float((ours - plain).abs().max())
    print(f"grm on smollm2: {len(responses)} responses, max |oodpl - transformers| = {diff:.3g}")
    assert diff < 1e-5
