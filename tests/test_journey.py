"""The user's journey on tiny models: the aligned policy saved as a PEFT adapter (loadable with peft alone, same
log-probabilities as in memory), merged, and sampled with `oodpl generate`; see docs/usage.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_models
from oodpl.models.sampling import collate, encode_prompts, encode_responses, policy_logprobs

FIX = Path(__file__).parent / "fixtures"


def _perturbed_policy(dtype="float32", trainable="lora"):
    policy, _ = tiny_models(dtype, trainable=trainable)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def _batch(tok):
    prompts = ["the film was", "my order came early and"]
    responses = ["truly wonderful", "well packed, thanks"]
    return collate(encode_prompts(tok, prompts, 16), encode_responses(tok, prompts, responses, 8), tok.pad_token_id)


def test_saved_adapter_loads_with_peft_alone_and_matches(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oodpl.models.export import POLICY_META, save_policy

    policy = _perturbed_policy()
    out = save_policy(policy, tmp_path / "policy", merge=True, metadata={"domain": "d", "beta_test": 0.1})
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and (Path(base) / "config.json").is_file()  # tiny base: saved, path recorded
    assert json.loads((out / POLICY_META).read_text())["beta_test"] == 0.1
    batch = _batch(policy.tokenizer)
    with torch.no_grad():
        want = policy.logprobs(batch)
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
        got = policy_logprobs(loaded, batch)
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
        got_merged = policy_logprobs(merged, batch)
        with policy.reference() as ref:
            ref_lp = policy_logprobs(ref, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_merged, want, rtol=1e-5, atol=1e-5)
    assert (want - ref_lp).abs().max() > 1e-3  # the adapter is not the reference
    # transformers generation from the peft-loaded adapter
    tok = AutoTokenizer.from_pretrained(str(out))
    gen = loaded.generate(**tok(["the film was"], return_tensors="pt"), do_sample=True, max_new_tokens=4,
                          pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > 3


def test_full_finetuned_policy_saved_as_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from oodpl.models.export import save_policy

    policy = _perturbed_policy(trainable="full")
    out = save_policy(policy, tmp_path / "full")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    batch = _batch(policy.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(policy_logprobs(AutoModelForCausalLM.from_pretrained(str(out)).eval(), batch),
                                   policy.logprobs(batch), rtol=0, atol=1e-6)


def test_generate_from_saved_policy_and_base(tmp_path):
    from oodpl.config import load_config
    from oodpl.models.export import save_policy
    from oodpl.adapt.generate import generate_command

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    policy = _perturbed_policy()
    save_policy(policy, tmp_path / "policy")
    res = generate_command(cfg, str(tmp_path / "policy"), str(FIX / "hh_rlhf_sample.jsonl"),
                           str(tmp_path / "s.jsonl"), num_samples=2, domain="helpful", quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert res["responses"] == len(rows) == 8 and {r["domain"] for r in rows} == {"helpful"}
    assert all(isinstance(r["response"], str) for r in rows)
    base = generate_command(cfg, None, str(FIX / "prompts.jsonl"), str(tmp_path / "b.jsonl"), quiet=True)
    assert base["policy"] == "tiny-random" and base["responses"] == 4


def test_tracking_config_names_project_run_and_log_dir(tmp_path):
    from oodpl.config import TrackingConfig
    from oodpl.runtime.runlog import MetricsLogger

    tracking = TrackingConfig(project="p", run_name="my-run", log_dir=str(tmp_path / "tb"))
    logger = MetricsLogger(tmp_path / "run", ["tensorboard"], tracking=tracking, stage="meta-test")
    (tmp_path / "run").mkdir(exist_ok=True)
    child = logger.child("meta-test/d1/beta_0.1")
    child.log(1, {"reward": 0.5, "kl": 0.01})
    logger.close()
    assert logger.run_name == "my-run" and list((tmp_path / "tb" / "my-run").glob("events.out.tfevents*"))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row == {"step": 1, "stage": "meta-test/d1/beta_0.1", "reward": 0.5, "kl": 0.01}
    default = MetricsLogger(tmp_path / "run2", ["none"], stage="dpo")
    assert default.run_name == "dpo-run2" and default.tb_dir == tmp_path / "run2" / "tensorboard"


def test_cli_frictions(tmp_path, capsys):
    from oodpl.cli.main import build_parser, main
    from oodpl.cli.confdoc import settings_table
    from oodpl.errors import UserError
    from oodpl.evaluation.judges import make_judge

    # --quiet / --debug after the subcommand
    assert main(["data", "validate", str(FIX / "hh_rlhf_sample.jsonl"), "--quiet"]) == 0
    assert main(["config", "show", "tracking", "-q"]) == 0
    out = capsys.readouterr().out
    assert "tracking.project" in out and "oodpl" in out
    # every key has a default and one line of meaning; an unknown section is one line, exit 2
    assert all(meaning for _, _, meaning in settings_table())
    assert main(["config", "show", "nope"]) == 2
    # --help lists the config sections
    sub = build_parser()._subparsers._group_actions[0].choices["meta-test"]
    assert "oodpl config show" in sub.format_help() and "meta_test:" in sub.format_help()
    # the llm judge's error names settings that exist
    with pytest.raises(UserError, match=r"eval\.llm_url.*eval\.llm_model"):
        make_judge("llm", None)


TRL_SECTION = "## Coming from TRL"


def _usage_commands(trl: bool = False) -> list[str]:
    """The `oodpl ...` lines of the bash blocks of docs/usage.md, in order: the main journey, or (`trl`) its "Coming
    from TRL" section."""
    text = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    main_part, trl_part = text.split(TRL_SECTION, 1)
    blocks = (trl_part.split("\n## ", 1)[0] if trl else main_part).split("```bash")[1:]
    return [line.strip() for b in blocks for line in b.split("```")[0].splitlines()
            if line.strip().startswith("oodpl ")]


def _journey_files(tmp_path: Path, root: Path) -> None:
    """my_pairs.jsonl (3 labelled domains), my_prompts.jsonl (hh-rlhf-shaped, no labels) and my.yaml (tiny models)."""
    import yaml

    rows = [{"domain": d, "prompt": f"{d} says {i}", "chosen": f"lovely kind words {i}", "rejected": f"awful {i}"}
            for d in ("alpha", "beta", "travel") for i in range(12)]
    (tmp_path / "my_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_prompts.jsonl").write_text((FIX / "hh_rlhf_sample.jsonl").read_text())
    cfg = yaml.safe_load((root / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {"task": "file", "path": "my_pairs.jsonl", "held_out_domains": ["travel"], "support_size": 4,
                   "query_size": 4, "adapt_prompts": 2, "eval_prompts": 2, "eval_pairs": 4}
    cfg["meta"].update({"query_batch": 4})
    cfg["meta_test"]["beta_test"] = [0.1]
    cfg["reward"]["max_length"] = 256  # the tiny reward model's positions; the hh-rlhf-shaped prompts are long
    cfg["eval"] = {"samples_per_prompt": 2}  # judge auto: a user's prompts-only domain has none
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))


def test_usage_md_journey(tmp_path, monkeypatch):
    """docs/usage.md, command by command, on tiny models: TRL-format pairs -> meta-train -> align on an unlabeled
    (prompts-only, hh-rlhf-shaped) domain -> generate with the saved adapter -> evaluate."""
    import shlex

    from oodpl.cli.main import main

    root = Path(__file__).parents[1]
    _journey_files(tmp_path, root)
    monkeypatch.chdir(tmp_path)
    commands = _usage_commands()
    assert [c.split()[1] for c in commands] == ["data", "data", "meta-train", "score", "meta-test", "generate",
                                                "evaluate", "evaluate"]
    for command in commands:
        assert main(["--quiet", *shlex.split(command)[1:]]) == 0, command
    adapter = tmp_path / "runs" / "align" / "policies" / "support" / "beta_0.1"
    assert (adapter / "adapter_config.json").is_file()
    index = json.loads((tmp_path / "runs" / "align" / "meta_test.json").read_text())
    assert any("prompts only" in n for n in index["notes"])
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["domain"] for s in samples} == {"support"}
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "align" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["stage"] == "support/beta_0.1"
    assert json.loads((adapter.parent.parent / "base_model" / "config.json").read_text())  # tiny base saved once
    # evaluate --samples on the prompts-only domain: kl measured, what needs a gold judge skipped and named
    ev = json.loads((tmp_path / "runs" / "eval_align" / "evaluation.json").read_text())
    m = ev["domains"]["support"]["meta_test"]["0.1"]
    assert isinstance(m["kl"], float) and m["gold_reward"] is None
    assert any("gold_reward" in line and "no automatic gold judge for task 'prompts'" in line for line in ev["skipped"])
    # the same with a judge that needs no reference answers: gold metrics measured, nothing skipped
    assert main(["--quiet", "evaluate", "--config", "my.yaml", "--samples", "runs/align", "--output", "runs/ev_v",
                 "--set", "eval.judge=vader"]) == 0
    ev = json.loads((tmp_path / "runs" / "ev_v" / "evaluation.json").read_text())
    assert ev["skipped"] == [] and isinstance(ev["domains"]["support"]["meta_test"]["0.1"]["gold_reward"], float)


def test_usage_md_coming_from_trl(tmp_path, monkeypatch):
    """The "Coming from TRL" section, command by command: a TRL LoRA reward model (RewardTrainer with a
    peft_config, trained here on a tiny model) and TRL conversational multi-turn data with system messages."""
    import shlex

    from oodpl.cli.main import main
    from test_trl_lora_rm import train_trl_lora_reward_model

    root = Path(__file__).parents[1]
    _journey_files(tmp_path, root)
    rm_dir = train_trl_lora_reward_model(tmp_path / "trl_train", fixture="multi_turn_sample.jsonl")
    rm_dir.rename(tmp_path / "trl_rm")
    (tmp_path / "trl_pairs.jsonl").write_text((FIX / "multi_turn_sample.jsonl").read_text())
    from oodpl.data.records import read_pairs

    conv = [p.prompt for p in read_pairs(FIX / "multi_turn_sample.jsonl")]
    assert max(len(c.messages) for c in conv) >= 5 and any(c.messages[0]["role"] == "system" for c in conv)
    (tmp_path / "trl_prompts.jsonl").write_text("".join(json.dumps({"prompt": c.messages}) + "\n" for c in conv))
    monkeypatch.chdir(tmp_path)
    commands = _usage_commands(trl=True)
    assert [c.split()[1] for c in commands] == ["data", "score", "meta-test", "generate", "evaluate"]
    for command in commands:
        assert main(["--quiet", *shlex.split(command)[1:]]) == 0, command
    assert (tmp_path / "runs" / "align_trl" / "policies" / "chat" / "beta_0.1" / "adapter_config.json").is_file()
    samples = [json.loads(x) for x in (tmp_path / "trl_samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == conv[0].messages  # conversations written back as messages
    ev = json.loads((tmp_path / "runs" / "eval_trl" / "evaluation.json").read_text())
    assert isinstance(ev["domains"]["chat"]["meta_test"]["0.1"]["kl"], float)


def test_prompt_only_held_out_domain_in_the_split_and_bad_prompts_file(tmp_path):
    from oodpl.cli.main import main
    from oodpl.config import DataConfig
    from oodpl.data.records import PairRecord, PromptRecord
    from oodpl.data.split import held_out_from_prompts, split_records

    pairs = [PairRecord(d, f"{d} q{i}", f"good {i}", f"bad {i}") for d in ("a", "b") for i in range(6)]
    prompts = [PromptRecord(d, f"{d} q{i}") for d in ("a", "b") for i in range(6)]
    prompts += [PromptRecord("target", f"new question {i}") for i in range(5)]
    cfg = DataConfig(task="file", held_out_domains=["target"], support_size=2, query_size=2, adapt_prompts=3,
                     eval_prompts=2)
    split = split_records("file", pairs, prompts, cfg)
    ho = split.held_out["target"]
    assert len(ho.adapt_prompts) == 3 and len(ho.eval_prompts) == 2 and ho.eval_pairs == [] == ho.oracle_pairs
    assert not {p.prompt for p in ho.adapt_prompts} & {p.prompt for p in ho.eval_prompts}
    own = held_out_from_prompts([PromptRecord("mine", f"p{i}") for i in range(7)], cfg).held_out["mine"]
    assert (len(own.eval_prompts), len(own.adapt_prompts)) == (2, 5)
    # a bad --prompts file: one line, exit 2, and the output directory is not claimed
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": {"oops": 1}}) + "\n")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                             "num_labels": 1}))
    out = tmp_path / "out"
    assert main(["meta-test", "--reward-model", str(tmp_path / "rm"), "--prompts", str(bad), "-o", str(out),
                 "--set", "policy.name_or_path=tiny-random", "--set", "reward.name_or_path=tiny-random"]) == 2
    assert not out.exists()


def test_moved_run_directory_still_loads_with_peft_and_transformers(tmp_path):
    """A run directory moved after meta-test: every saved policy and reward model loads (oodpl's loader and plain
    peft / transformers) and gives the same logits; adapters say task_type CAUSAL_LM."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from oodpl.models.export import load_saved_policy, save_policy

    policy = _perturbed_policy()
    _, rm = tiny_models("float32")
    run = tmp_path / "runs" / "align"
    adapter = save_policy(policy, run / "policies" / "d" / "beta_0.1", base_dir=run / "policies" / "base_model")
    rm.save(run / "reward_model")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    batch = _batch(policy.tokenizer)
    with torch.no_grad():
        want = policy.logprobs(batch)
        want_rm = rm.score(["the film was"], [" great"])
    moved = tmp_path / "elsewhere" / "align_moved"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert not Path(config["base_model_name_or_path"]).exists()  # the recorded absolute path is gone
    loaded, _, _ = load_saved_policy(moved / "policies" / "d" / "beta_0.1")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved / "policies" / "base_model"),
                                      moved / "policies" / "d" / "beta_0.1").eval()
    rm_plain = AutoModelForSequenceClassification.from_pretrained(moved / "reward_model").eval()
    with torch.no_grad():
        torch.testing.assert_close(policy_logprobs(loaded, batch), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(policy_logprobs(plain, batch), want, rtol=0, atol=1e-6)
        enc = rm.encode(["the film was"], [" great"])
        torch.testing.assert_close(rm_plain(**enc).logits[:, 0], want_rm)


def test_default_policy_adapter_records_the_hub_id_of_its_package_model(tmp_path):
    """The default policy's adapter names a base that resolves on any machine (its hub id), not a cache path."""
    import dataclasses

    from oodpl.models.export import POLICY_META, save_policy
    from oodpl.models.sources import POLICY_HUB_IDS

    policy = _perturbed_policy()
    policy.config = dataclasses.replace(policy.config, name_or_path="smollm2-135m-instruct")
    out = save_policy(policy, tmp_path / "p", base_dir=tmp_path / "base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == POLICY_HUB_IDS["smollm2-135m-instruct"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["task_type"] == "CAUSAL_LM" and not (tmp_path / "base").exists()
    assert json.loads((out / POLICY_META).read_text())["policy"] == "smollm2-135m-instruct"


def test_lora_dropout_dora_and_peft_config_pass_through():
    import dataclasses

    from oodpl.config import PolicyConfig
    from oodpl.errors import UserError
    from oodpl.models.policy import load_policy

    base = PolicyConfig(name_or_path="tiny-random", lora_r=2, lora_alpha=4)
    cfg = dataclasses.replace(base, lora_dropout=0.1, use_dora=True, peft_config={"rank_pattern": {"c_attn": 3}})
    policy = load_policy(cfg)
    lcfg = policy.model.peft_config["default"]
    assert (lcfg.lora_dropout, lcfg.use_dora, lcfg.rank_pattern, lcfg.task_type) == (0.1, True, {"c_attn": 3},
                                                                                     "CAUSAL_LM")
    assert any("lora_magnitude_vector" in n for n in policy.trainable_parameters())  # DoRA's magnitudes
    batch = _batch(policy.tokenizer)
    with torch.no_grad(), policy.reference() as ref:
        torch.testing.assert_close(policy.logprobs(batch), policy_logprobs(ref, batch))  # pi_theta0 == pi_ref
    with pytest.raises(UserError, match="policy.peft_config sets r"):
        load_policy(dataclasses.replace(base, peft_config={"r": 4}))
    with pytest.raises(UserError, match="peft.LoraConfig refuses"):
        load_policy(dataclasses.replace(base, peft_config={"no_such_option": 1}))
