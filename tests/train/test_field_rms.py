"""The field's reward models (field_rms.py) against what each must equal or satisfy: MetaRM's meta-gradient against
finite differences in float64 and plain BT at ascent step 0; GRM's loss equal to BT at weight 0 and its SFT term equal
to transformers' causal-LM loss, its checkpoint scored by transformers and TRL as by oodpl; WARM's average equal to the
element-wise mean of its members and to the erm-rm fit at M = 1."""

from __future__ import annotations

import json

import pytest
import torch

from oodpl.experiment import methods as registry
from oodpl.config import RewardConfig, load_config
from oodpl.data.records import PairRecord
from oodpl.errors import UserError
from oodpl.train.field_rms import (GRMStep, MetaRMStep, captured_hidden, causal_lm_loss, decoder_lm_head, member_seed,
                                   metarm_objective, prompt_groups_from_samples, response_logps, sft_labels,
                                   within_prompt_pairs)
from oodpl.models.reward import load_reward_checkpoint, load_reward_model
from oodpl.core.objectives import bradley_terry_loss
from oodpl.train.rm_train import BTStep, fit_reward_model

PAIRS = [PairRecord(prompt=p, chosen=c, rejected=r, domain=d) for p, c, r, d in [
    ("the film was", " truly wonderful and fun", " dull and a waste", "a"),
    ("my order came", " early and well packed", " broken, never again", "a"),
    ("service here is", " kind and quick", " rude and slow", "b"),
    ("i think that", " it is lovely", " it is awful", "b"),
    ("the plot felt", " fresh and bold", " thin", "a"),
]]
GROUPS = [("the film was", [" great", " awful and long", " fine I guess"]),
          ("overall it", [" was good", " was bad"]),
          ("my order came", [" late", " on time", " never", " broken"])]


def tiny_cfg(*sets: str, reward: str = "tiny-random"):
    return load_config(None, [f"reward.name_or_path={reward}", "policy.name_or_path=tiny-random",
                              "reward.max_length=64",
                              "train_rm.batch_size=2", "train_rm.epochs=2", "train_rm.lr=1e-2", "report_to=[none]",
                              "policy.max_new_tokens=4", "rloo.num_samples=2", *sets])


def train(method: str, cfg, tmp_path, name: str | None = None, **job):
    out = tmp_path / (name or method)
    registry.get(method).trainer(registry.TrainJob(cfg, out, pairs=list(PAIRS), what=method, **job))
    return out


def states(out):
    return dict(load_reward_checkpoint(out / "reward_model", RewardConfig()).model.state_dict())


def assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.0, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------------------------- metarm
def _metarm_inputs(rm):
    step = MetaRMStep(rm, GROUPS, load_config(None).field, seed=0)
    rows = list(range(sum(step.sizes)))
    enc_c, enc_r = BTStep(rm).encodings(PAIRS)
    return enc_c, enc_r, step.encoded, within_prompt_pairs(step.sizes), rows


def test_difference_loss_pairs_are_within_prompt():
    i, j = within_prompt_pairs([3, 2])
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]


def test_metarm_meta_gradient_matches_finite_differences_in_float64():
    rm = load_reward_model(load_config(None, ["reward.name_or_path=tiny-random", "reward.dtype=float64"]).reward)
    model = rm.model
    enc_c, enc_r, enc_s, pairs, _ = _metarm_inputs(rm)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    eta, lam = 30.0, 0.5  # a long step: the tiny RM's rewards are nearly flat at initialisation

    def objective(ps):
        return metarm_objective(model, ps, enc_c, enc_r, enc_s, pairs, eta, lam)[0]

    grads = torch.autograd.grad(objective(params), list(params.values()))
    gen = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    analytic = sum((g * direction[k]).sum() for k, g in zip(params, grads))
    eps = 1e-5
    plus = objective({k: v + eps * direction[k] for k, v in params.items()})
    minus = objective({k: v - eps * direction[k] for k, v in params.items()})
    numeric = (plus - minus) / (2 * eps)
    assert abs(float(analytic - numeric.detach())) / abs(float(numeric.detach())) < 1e-4

    # the second-order term matters here: phi' held fixed (first order) gives a measurably different derivative
    j = metarm_objective(model, params, enc_c, enc_r, enc_s, pairs, 0.0, 0.0)[1]["j"]
    assert j > 0.5
    from oodpl.train.field_rms import difference_loss
    from torch.func import functional_call

    def rewards(p, enc):
        return functional_call(model, p, args=(), kwargs=enc).logits.squeeze(-1)

    gj = torch.autograd.grad(difference_loss(rewards(params, enc_s), pairs), list(params.values()))
    fixed = {k: (v + eta * g).detach().requires_grad_(True) for (k, v), g in zip(params.items(), gj)}
    first = bradley_terry_loss(rewards(fixed, enc_c), rewards(fixed, enc_r)) \
        - lam * difference_loss(rewards(fixed, enc_s), pairs)
    g1 = torch.autograd.grad(first, list(fixed.values()))
    first_order = sum((g * direction[k]).sum() for k, g in zip(params, g1))
    assert abs(float(first_order - numeric.detach())) / abs(float(numeric.detach())) > 1e-3


def test_metarm_at_ascent_step_zero_is_plain_bt(tmp_path):
    # float64: MetaRM's passes use the math attention kernel, BT's the fused one; Adam magnifies their float32
    # rounding where a gradient is ~0 (BERT's key bias), float64 leaves 1e-15
    cfg = tiny_cfg("field.metarm_ascent_lr=0.0", "field.metarm_j_weight=0.0", "reward.dtype=float64")
    meta = train("metarm", cfg, tmp_path, banks={}, target_samples=GROUPS)
    bt = train("erm-rm", cfg, tmp_path)
    assert_same_weights(states(meta), states(bt), atol=1e-12)
    info = json.loads((meta / "train.json").read_text())
    assert info["shifted_prompts"] == 3 and info["shifted_samples"] == 9 and info["target_prompts"] == 3
    # and the ascent changes the fit (the equality above is not vacuous)
    moved = train("metarm", tiny_cfg("field.metarm_ascent_lr=5.0", "reward.dtype=float64"), tmp_path, "metarm-5",
                  banks={}, target_samples=GROUPS)
    assert any(not torch.equal(a, b) for a, b in zip(states(moved).values(), states(bt).values()))


def test_metarm_refuses_without_pi_ref_samples(tmp_path):
    with pytest.raises(UserError, match="pi_ref samples"):
        train("metarm", tiny_cfg(), tmp_path, banks={}, target_samples=[("x", [" only one"])])


def test_prompt_groups_from_samples_keeps_each_prompts_responses_together():
    from oodpl.adapt.metatest import PolicySamples

    s = PolicySamples(prompts=["a", "a", "b", "b", "b"], responses=["1", "2", "3", "4", "5"], logp=[0.0] * 5,
                      ref_logp=[0.0] * 5)
    assert prompt_groups_from_samples(s) == [("a", ["1", "2"]), ("b", ["3", "4", "5"])]


# ------------------------------------------------------------------------------------------------------------- grm
def _decoder_rm(dtype: str = "float32"):
    return load_reward_model(load_config(None, ["reward.name_or_path=tiny-random-llama", f"reward.dtype={dtype}"])
                             .reward, seed=3)


def _causal_lm_twin(rm):
    """transformers' causal LM with the decoder RM's backbone weights (the LM head tied to the embeddings)."""
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(rm.model.config)
    missing, unexpected = lm.load_state_dict(rm.model.state_dict(), strict=False)
    assert unexpected == ["score.weight"] and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    lm.tie_weights()
    return lm.eval()


def test_grm_sft_term_equals_transformers_causal_lm_loss():
    rm = _decoder_rm()
    lm = _causal_lm_twin(rm)
    prompts, chosen = [p.prompt for p in PAIRS], [p.chosen for p in PAIRS]
    enc = rm.encode(prompts, chosen)
    labels = sft_labels(enc, rm.prompt_lengths(prompts))
    # labels: exactly the response tokens (prompt + response + eos, minus the prompt), nothing of the padding
    lengths = enc["attention_mask"].sum(1)
    assert ((labels != -100).sum(1) == lengths - torch.tensor(rm.prompt_lengths(prompts))).all()
    with captured_hidden(rm.model) as hidden:
        rm.model(**enc)
    ours = causal_lm_loss(hidden[0], labels, decoder_lm_head(rm))
    theirs = lm(**enc, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)

    step = GRMStep(rm, weight=0.25)  # the whole step: BT of the score head + w * that SFT term
    loss, parts = step(rm.model, PAIRS, torch.device("cpu"))
    r_c, r_r = rm.score(prompts, chosen), rm.score(prompts, [p.rejected for p in PAIRS])
    torch.testing.assert_close(loss, bradley_terry_loss(r_c, r_r) + 0.25 * theirs, rtol=1e-6, atol=1e-6)
    assert parts["sft_loss"] == pytest.approx(float(theirs), rel=1e-6)


def test_grm_logsigmoid_regularizer_equals_grms_released_loss():
    """grm_regularizer logsigmoid-sft against GRM's released trainer's loss (sft_only, reference_free), written out
    from transformers' logits: per row the SUM of the response tokens' log-probs (get_batch_logps), then
    (1 - w) * BT + w * -log sigmoid(beta * that); at w = 0 exactly BT."""
    rm = _decoder_rm()
    lm = _causal_lm_twin(rm)
    prompts, chosen = [p.prompt for p in PAIRS], [p.chosen for p in PAIRS]
    enc = rm.encode(prompts, chosen)
    labels = sft_labels(enc, rm.prompt_lengths(prompts))[:, 1:]
    with torch.no_grad():
        logits = lm(**enc).logits[:, :-1]
    mask = labels != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    logps = (token_logps * mask).sum(-1)
    assert (logps < 0).all()  # every row has response tokens
    r_c, r_r = rm.score(prompts, chosen), rm.score(prompts, [p.rejected for p in PAIRS])
    bt = bradley_terry_loss(r_c, r_r)
    for w, beta in ((0.25, 0.1), (0.5, 1.0)):
        theirs = -torch.nn.functional.logsigmoid(beta * logps).mean()
        loss, parts = GRMStep(rm, w, "logsigmoid-sft", beta)(rm.model, PAIRS, torch.device("cpu"))
        torch.testing.assert_close(loss, (1 - w) * bt + w * theirs, rtol=1e-6, atol=1e-6)
        assert parts["sft_loss"] == pytest.approx(float(theirs.detach()), rel=1e-6)
    loss, _ = GRMStep(rm, 0.0, "logsigmoid-sft")(rm.model, PAIRS, torch.device("cpu"))
    torch.testing.assert_close(loss, bt, rtol=1e-6, atol=1e-6)


def test_grm_response_logps_of_a_row_without_labels_is_zero():
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, -100, -100, -100]])
    head = torch.nn.Linear(3, 5)
    lp = response_logps(hidden, labels, head)
    expected = head(hidden[0, 1:3]).log_softmax(-1)[[0, 1], [1, 2]].sum()
    torch.testing.assert_close(lp, torch.stack([expected, torch.tensor(0.0)]))
    assert float(response_logps(hidden, torch.full_like(labels, -100), head).abs().sum()) == 0.0


def test_grm_logsigmoid_weight_above_one_is_refused():
    with pytest.raises(UserError, match=r"grm_sft_weight.*\[0, 1\]"):
        tiny_cfg("field.grm_regularizer=logsigmoid-sft", "field.grm_sft_weight=1.5")
    tiny_cfg("field.grm_sft_weight=1.5")  # the "sft" form adds the term: any weight >= 0


@pytest.mark.parametrize("regularizer", ["sft", "logsigmoid-sft"])
def test_grm_at_weight_zero_is_plain_bt(tmp_path, regularizer):
    cfg = tiny_cfg("field.grm_sft_weight=0.0", f"field.grm_regularizer={regularizer}", reward="tiny-random-llama")
    assert_same_weights(states(train("grm", cfg, tmp_path)), states(train("erm-rm", cfg, tmp_path)))
    moved = train("grm", tiny_cfg("field.grm_sft_weight=1.0", f"field.grm_regularizer={regularizer}",
                                  reward="tiny-random-llama"), tmp_path, "grm-1")
    assert any(not torch.equal(a, b) for a, b in zip(states(moved).values(),
                                                       states(tmp_path / "erm-rm").values()))


def test_grm_checkpoint_scores_as_transformers_and_trl(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.utils import get_reward

    out = train("grm", tiny_cfg(reward="tiny-random-llama"), tmp_path)
    ckpt = out / "reward_model"
    rm = load_reward_checkpoint(ckpt, tiny_cfg(reward="tiny-random-llama").reward)
    ours = rm.score([p.prompt for p in PAIRS], [p.chosen for p in PAIRS]).detach()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        plain = torch.stack([model(**tok(p.prompt + p.chosen + tok.eos_token, return_tensors="pt")).logits[0, 0]
                             for p in PAIRS])
        enc = rm.encode([p.prompt for p in PAIRS], [p.chosen for p in PAIRS])
        _, trl_scores, _ = get_reward(model, enc["input_ids"], tok.pad_token_id, 0)  # TRL's online-RL scoring
    assert (ours - plain).abs().max() < 1e-5
    assert (ours - trl_scores).abs().max() < 1e-5


def test_grm_needs_a_decoder_reward_model(tmp_path):
    with pytest.raises(UserError, match="decoder"):
        train("grm", tiny_cfg(), tmp_path)
    with pytest.raises(UserError, match="reward.name_or_path"):
        registry.check_requirements(tiny_cfg(), ["erm-rm", "grm"])
    registry.check_requirements(tiny_cfg(reward="tiny-random-llama"), ["erm-rm", "grm"])


# ------------------------------------------------------------------------------------------------------------ warm
def test_warm_average_is_the_elementwise_mean_of_its_members(tmp_path):
    cfg = tiny_cfg("field.warm_members=3")
    averaged = states(train("warm-rm", cfg, tmp_path))
    members = [fit_reward_model(cfg, list(PAIRS), seed=member_seed(cfg.seed, m), init_seed=cfg.seed)[0]
               .model.state_dict() for m in range(3)]
    assert not torch.equal(members[0]["classifier.weight"], members[1]["classifier.weight"])  # orders differ
    for k, v in averaged.items():
        if v.is_floating_point():
            expect = torch.stack([m[k].double() for m in members]).mean(0).to(v.dtype)
            torch.testing.assert_close(v, expect, rtol=0.0, atol=1e-7, msg=k)
    # one initialisation: every member starts from the run's seeded fresh RM
    init = [load_reward_model(cfg.reward, seed=cfg.seed).model.state_dict()["classifier.weight"] for _ in range(2)]
    assert torch.equal(*init)
    info = json.loads((tmp_path / "warm-rm" / "train.json").read_text())
    assert [m["order_seed"] for m in info["members"]] == [member_seed(0, m) for m in range(3)]


def test_warm_with_one_member_is_the_erm_fit(tmp_path):
    cfg = tiny_cfg("field.warm_members=1")
    assert_same_weights(states(train("warm-rm", cfg, tmp_path)), states(train("erm-rm", cfg, tmp_path)))


# ------------------------------------------------------------------------------------------------ registry, config
def test_field_methods_are_standalone_tunable_and_take_erm_rms_learning_rate():
    for name in ("metarm", "grm", "warm-rm"):
        m = registry.get(name)
        assert m.standalone and m.tunable and m.base_choice == "erm-rm"
    selected = {"erm-rm": {"train_rm.lr": 3e-4}, "grm": {"field.grm_sft_weight": 0.1}}
    c = registry.method_config(tiny_cfg(), 0, "grm", selected)
    assert c.train_rm.lr == 3e-4 and c.field.grm_sft_weight == 0.1
    assert registry.method_config(tiny_cfg(), 0, "warm-rm", selected).train_rm.lr == 3e-4
    assert registry.get("metarm").shifted_samples and registry.get("grm").decoder_rm


@pytest.mark.parametrize("key,value", [("field.warm_members", 0), ("field.metarm_ascent_lr", -1.0),
                                       ("field.grm_sft_weight", -0.1), ("field.metarm_batch_prompts", 0)])
def test_field_settings_are_validated(key, value):
    with pytest.raises(UserError, match=key):
        load_config(None, [f"{key}={value}"])


# ------------------------------------------------------------------------------------ commands: train-rm, benchmark
DECODER = ["--set", "reward.name_or_path=tiny-random-llama"]


@pytest.mark.parametrize("method", ["metarm", "grm", "warm-rm"])
def test_train_rm_method_writes_a_checkpoint_that_meta_test_optimises(tmp_path, method):
    from oodpl.cli.main import main

    out = tmp_path / method
    assert main(["--quiet", "train-rm", "--config", "configs/tiny.yaml", "-o", str(out), "--method", method,
                 *DECODER, "--set", "field.warm_members=2"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == method and summary["train"]["what"] == method
    if method == "metarm":  # pi_ref samples of the split's support prompts: 2 meta-train domains x 4 prompts
        assert summary["train"]["shifted_prompts"] == 8 and (out / "bank").is_dir()
    assert main(["--quiet", "meta-test", "--config", "configs/tiny.yaml", "--reward-model", str(out / "reward_model"),
                 "--output", str(tmp_path / "mt"), "--domains", "vader_amazon", *DECODER]) == 0
    assert (tmp_path / "mt" / "policies" / "vader_amazon").is_dir()


def test_train_rm_metarm_on_a_pairs_file_samples_its_prompts(tmp_path):
    from oodpl.cli.main import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                         "domain": p.domain}) + "\n" for p in PAIRS * 2))
    out = tmp_path / "out"
    assert main(["--quiet", "train-rm", "--config", "configs/tiny.yaml", "-o", str(out), "--method", "metarm",
                 "--pairs", str(pairs), "--set", "data.support_size=2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["shifted_prompts"] == 4  # 2 per domain


def test_train_rm_grm_on_an_encoder_is_a_user_error(tmp_path, capsys):
    from oodpl.cli.main import main

    assert main(["--quiet", "train-rm", "--config", "configs/tiny.yaml", "-o", str(tmp_path / "o"),
                 "--method", "grm"]) != 0
    assert "needs a decoder reward model" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_benchmark_tunes_trains_and_meta_tests_the_field_rms(tmp_path):
    from oodpl.cli.main import main

    out = tmp_path / "bench"
    grids = ("select.grids={erm-rm: {train_rm.lr: [1e-4, 3e-3]}, metarm: {field.metarm_ascent_lr: [0.01, 0.1]}, "
             "grm: {field.grm_sft_weight: [0.01, 0.1]}, warm-rm: {field.warm_members: [1, 2]}}")
    assert main(["--quiet", "benchmark", "--config", "configs/tiny.yaml", "--output", str(out), *DECODER,
                 "--set", "benchmark.methods=[reference, erm-rm, metarm, grm, warm-rm]", "--set", "benchmark.seeds=[0]",
                 "--set", "benchmark.select=true", "--set", grids, "--set", "meta_test.beta_test=[0.1]"]) == 0
    res = json.loads((out / "results.json").read_text())
    sel = json.loads((out / "select" / "selection.json").read_text())["methods"]
    assert sorted(sel) == ["erm-rm", "grm", "metarm", "warm-rm"]
    assert all(len(v["candidates"]) == 2 for v in sel.values())  # the same number of candidates each
    # a select fold leaves domain d out of training, and MetaRM sees d's support prompts' pi_ref samples (no labels)
    fold = json.loads(next((out / "select" / "metarm" / "candidate-0").glob("fold-*/train.json")).read_text())
    assert fold["target_prompts"] == 4 and fold["shifted_prompts"] == 4 + 4
    # in the benchmark: the meta-train support prompts plus the held-out adaptation prompts (2 domains x 2)
    info = json.loads((out / "seed-0" / "metarm" / "train.json").read_text())
    assert info["target_prompts"] == 4 and info["shifted_prompts"] == 8 + 4
    assert info["ascent_lr"] == sel["metarm"]["best"]["field.metarm_ascent_lr"]
    assert info["lr"] == float(sel["erm-rm"]["best"]["train_rm.lr"])  # erm-rm's tuned BT learning rate
    for m in ("metarm", "grm", "warm-rm"):
        cells = [c for c in res["cells"] if c["method"] == m]
        assert len(cells) == 2 and all(c["metrics"]["pl_accuracy"] is not None for c in cells)
        assert all(c["frontier"] for c in cells)  # meta-tested
        assert res["method_notes"][m]["reward_backbone"] == "tiny-random-llama"
    assert res["method_notes"]["metarm"]["target_prompts"] and not res["method_notes"]["grm"]["target_prompts"]
    report = (out / "report.md").read_text()
    assert "## Methods" in report and "held-out adaptation prompts' pi_ref samples (no labels)" in report
