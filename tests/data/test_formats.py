"""TRL's preference-data shapes (standard, implicit prompt, conversational), SHP rows, files without a domain column,
and the reward model's input formats (concat / pair / chat) checked against TRL's RewardTrainer tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oodpl.data.records import read_pairs, read_prompts
from oodpl.errors import UserError

FIX = Path(__file__).parents[1] / "fixtures"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hh_rlhf_implicit_prompt_extracted_as_trl_does():
    from trl.data_utils import extract_prompt

    rows = [json.loads(x) for x in (FIX / "hh_rlhf_sample.jsonl").read_text().splitlines()]
    pairs = read_pairs(FIX / "hh_rlhf_sample.jsonl")
    assert len(pairs) == len(rows) == 4
    for p, row in zip(pairs, rows):
        want = extract_prompt(row)
        assert (p.prompt, p.chosen, p.rejected) == (want["prompt"], want["chosen"], want["rejected"])
        assert p.prompt.endswith("\n\nAssistant:") and p.chosen.startswith(" ")  # the space goes with the response
        assert p.domain == "hh_rlhf_sample"  # no domain column: the file's name
    assert {p.domain for p in read_pairs(FIX / "hh_rlhf_sample.jsonl", domain="helpful")} == {"helpful"}
    # its prompts, for a prompt-only target domain
    prompts = read_prompts(FIX / "hh_rlhf_sample.jsonl", domain="helpful")
    assert [q.prompt for q in prompts] == [p.prompt for p in pairs] and prompts[0].domain == "helpful"


def test_hh_rlhf_with_prompt_mapped_to_chosen_is_refused():
    with pytest.raises(UserError, match="mapped to both prompt and chosen"):
        read_pairs(FIX / "hh_rlhf_sample.jsonl", {"prompt": "chosen"})


def test_ultrafeedback_binarized_conversational():
    from trl.data_utils import maybe_extract_prompt

    rows = [json.loads(x) for x in (FIX / "ultrafeedback_binarized_sample.jsonl").read_text().splitlines()]
    pairs = read_pairs(FIX / "ultrafeedback_binarized_sample.jsonl", domain="uf")
    assert len(pairs) == 3 and {p.domain for p in pairs} == {"uf"}
    for p, row in zip(pairs, rows):
        ex = maybe_extract_prompt({k: row[k] for k in ("prompt", "chosen", "rejected")})
        assert p.prompt == ex["prompt"][0]["content"] == row["prompt"]
        assert p.chosen == ex["chosen"][0]["content"] and p.rejected == ex["rejected"][0]["content"]
    assert [q.prompt for q in read_prompts(FIX / "ultrafeedback_binarized_sample.jsonl")] == [r["prompt"] for r in rows]


def test_explicit_conversational_and_standard_without_domain(tmp_path):
    conv = _jsonl(tmp_path / "conv.jsonl", [{
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}])
    p = read_pairs(conv)[0]
    assert (p.domain, p.prompt, p.chosen, p.rejected) == ("conv", "Hi?", "Hello!", "Go away.")
    std = _jsonl(tmp_path / "std.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert read_pairs(std)[0].domain == "std"
    prompts = _jsonl(tmp_path / "target.jsonl", [{"prompt": "one"}, {"prompt": [{"role": "user", "content": "two"}]}])
    got = read_prompts(prompts, domain="mine")
    assert [(q.domain, q.prompt) for q in got] == [("mine", "one"), ("mine", "two")]


def test_shp_rows_load_as_pairs():
    pairs = read_pairs(FIX / "shp_sample.jsonl")
    assert pairs and all(p.domain.startswith("shp_") for p in pairs)
    first = json.loads((FIX / "shp_sample.jsonl").read_text().splitlines()[0])
    assert pairs[0].prompt == first["history"]
    assert pairs[0].chosen == (first["human_ref_A"] if first["labels"] == 1 else first["human_ref_B"])


@pytest.mark.parametrize("row, match", [
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": "text"}, "chosen is a conversation but rejected is not"),
    ({"chosen": "Same start but one", "rejected": "Different entirely"}, "do not start with a shared prompt"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "the prompt ends with a system message"),
    ({"prompt": "q", "chosen": ["a", "b"], "rejected": "c"}, "must be a string or a list of"),
])
def test_bad_shapes_name_row_and_expected_shape(tmp_path, row, match):
    f = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(UserError, match=match) as e:
        read_pairs(f)
    msg = str(e.value)
    assert "\n" not in msg and f"{f}:1" in msg


# ----------------------------------------------------------------------------------------------------------------------
# Reward-model input formats

CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")


def _tiny_seqcls(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from oodpl.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=512, n_inner=32, num_labels=1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0))
    return model, tok


@pytest.mark.parametrize("fixture, input_format", [("hh_rlhf_sample.jsonl", "concat"),
                                                   ("ultrafeedback_binarized_sample.jsonl", "chat"),
                                                   ("multi_turn_sample.jsonl", "chat")])
def test_trl_trained_rm_scores_identically(tmp_path, fixture, input_format):
    """A reward model trained by TRL's RewardTrainer scores each pair in oodpl exactly as TRL scores it."""
    import datasets
    import torch
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_checkpoint

    rows = [json.loads(x) for x in (FIX / fixture).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("chosen", "rejected")} for r in rows])  # implicit prompt
    model, tok = _tiny_seqcls()
    args = TRLRewardConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2,
                           learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no",
                           save_strategy="no", dataset_num_proc=None, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.save_model(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    # TRL's scores: the saved model on TRL's own tokenised dataset, batched by TRL's own collator
    from transformers import AutoModelForSequenceClassification

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trained = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        logits = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    trl_chosen, trl_rejected = logits[: len(rows)], logits[len(rows):]
    # oodpl's scores from the saved directory, on the pairs it reads from the same file
    rm = load_reward_checkpoint(tmp_path / "rm", RewardConfig(max_length=256, input_format=input_format))  # all positions
    pairs = read_pairs(FIX / fixture)
    ours_c = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    ours_r = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    torch.testing.assert_close(ours_c, trl_chosen.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_r, trl_rejected.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trl_chosen, trl_rejected)


def test_saved_rm_records_input_format_and_card(tmp_path):
    import torch

    from oodpl.runtime.checks import check_reward_model_dir
    from oodpl.config import RewardConfig
    from oodpl.models.reward import REWARD_META, RewardModel, load_reward_checkpoint

    model, tok = _tiny_seqcls()
    prompts, responses = ["Hi there?", "Why?"], [" Hello.", " Because it is long enough to pad."]
    for fmt in ("concat", "pair", "chat"):
        rm = RewardModel(model=model, tokenizer=tok, max_length=64, input_format=fmt)
        rm.save(tmp_path / fmt)
        assert json.loads((tmp_path / fmt / REWARD_META).read_text())["input_format"] == fmt
        assert json.loads((tmp_path / fmt / "config.json").read_text())["id2label"] == {"0": "reward"}
        assert "AutoModelForSequenceClassification" in (tmp_path / fmt / "README.md").read_text()
        check_reward_model_dir(tmp_path / fmt)
        back = load_reward_checkpoint(tmp_path / fmt, RewardConfig(max_length=64))
        assert back.input_format == fmt
        torch.testing.assert_close(back.score(prompts, responses), rm.score(prompts, responses))
    # the formats really differ, and concat is prompt + response + eos, padded on the right
    rm = RewardModel(model=model, tokenizer=tok, max_length=64, input_format="concat")
    enc = rm.encode(prompts, responses)
    assert enc["input_ids"][0, : enc["attention_mask"][0].sum()].tolist() == tok("Hi there? Hello.<eos>")["input_ids"]
    assert enc["attention_mask"][0, -1] == 0
    pair = RewardModel(model=model, tokenizer=tok, max_length=64, input_format="pair").encode(prompts, responses)
    chat = RewardModel(model=model, tokenizer=tok, max_length=64, input_format="chat").encode(prompts, responses)
    assert chat["input_ids"].shape != enc["input_ids"].shape and "input_ids" in pair
    # a config value wins over the stored one; an unknown one is refused by config validation
    assert load_reward_checkpoint(tmp_path / "chat", RewardConfig(input_format="pair")).input_format == "pair"
    from oodpl.config import load_config

    with pytest.raises(UserError, match="reward.input_format"):
        load_config(None, ["reward.input_format=text"])


def test_hub_loader_passes_config_data_dir_and_split(monkeypatch):
    import datasets

    from oodpl.data import records

    seen = {}

    def fake_load(repo, **kw):
        seen.update(repo=repo, **kw)
        return datasets.Dataset.from_list([{"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go"}])

    monkeypatch.setattr(records, "hub_available", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    pairs = read_pairs("Anthropic/hh-rlhf", hub={"name": None, "data_dir": "harmless-base", "split": "test"})
    assert seen == {"repo": "Anthropic/hh-rlhf", "split": "test", "data_dir": "harmless-base"}
    assert pairs[0].prompt == "Q: hi A:" and pairs[0].domain == "hh-rlhf"
    seen.clear()
    read_pairs("owner/name:validation", hub={"name": "cfg", "split": "train"})
    assert seen == {"repo": "owner/name", "split": "validation", "name": "cfg"}
