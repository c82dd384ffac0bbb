"""Chat models done right: multi-turn conversations and system messages read as TRL reads them and rendered with the
model's chat template exactly as TRL renders them (token ids of `maybe_apply_chat_template` on SmolLM2's tokenizer),
policy.chat_template auto / true / false, and reward.input_format chat on tokenizers without a template."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from oodpl.models.chat import PLAIN_CHAT_TEMPLATE, resolve_policy_template
from oodpl.data.conversation import Conversation, plain_text
from oodpl.data.records import read_pairs, read_prompts
from oodpl.errors import UserError

FIX = Path(__file__).parents[1] / "fixtures"
MULTI_TURN = [
    {"prompt": [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "Apple."},
                {"role": "user", "content": "Another one?"}],
     "chosen": [{"role": "assistant", "content": "Pear."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"chosen": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did..."}],
     "rejected": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                  {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}]},
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from oodpl.models.sources import load_policy_tokenizer

    try:
        return load_policy_tokenizer("smollm2-135m-instruct")
    except UserError as e:  # the model package is not installed
        pytest.skip(str(e))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_multi_turn_and_system_prompts_read_as_trl_extracts_them(tmp_path):
    from trl.data_utils import maybe_extract_prompt

    pairs = read_pairs(_jsonl(tmp_path / "conv.jsonl", MULTI_TURN))
    assert len(pairs) == 2
    for p, row in zip(pairs, MULTI_TURN):
        want = maybe_extract_prompt(dict(row))
        assert isinstance(p.prompt, Conversation) and p.prompt.messages == want["prompt"]
        assert [{"role": "assistant", "content": p.chosen}] == want["chosen"]
        assert [{"role": "assistant", "content": p.rejected}] == want["rejected"]
    # the plain rendering (the str value): "Role: content" turns, ending with the assistant's cue
    assert pairs[0].prompt == ("System: You are terse.\n\nUser: Name a fruit.\n\nAssistant: Apple.\n\n"
                               "User: Another one?\n\nAssistant:")
    assert plain_text([{"role": "user", "content": "q"}]) == "q"  # one user message: its text, as before
    # a stored split keeps the messages (JSON), and so do prompts files
    from oodpl.data.split import DomainSplit, HeldOutDomain

    split = DomainSplit("file", {}, {"d": HeldOutDomain("d", eval_pairs=pairs)})
    back = DomainSplit.from_json(json.loads(json.dumps(split.to_json())))
    assert back.held_out["d"].eval_pairs[0].prompt.messages == pairs[0].prompt.messages
    prompts = read_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": MULTI_TURN[0]["prompt"]}]))
    assert prompts[0].prompt.messages == MULTI_TURN[0]["prompt"]
    with pytest.raises(UserError, match="unknown message role 'robot'"):
        read_pairs(_jsonl(tmp_path / "bad.jsonl", [{**MULTI_TURN[0], "prompt": [{"role": "robot", "content": "x"}]}]))


def test_policy_tokens_equal_trl_maybe_apply_chat_template_on_smollm2(tmp_path, smol_tokenizer):
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    from oodpl.models.sampling import encode_prompts, encode_responses

    tok = smol_tokenizer
    assert resolve_policy_template("auto", tok, "smollm2") is True  # the default: on for an instruct model
    pairs = read_pairs(_jsonl(tmp_path / "conv.jsonl", MULTI_TURN))
    rows = MULTI_TURN + [{"prompt": [{"role": "user", "content": "Hi?"}],
                          "chosen": [{"role": "assistant", "content": "Hello!"}],
                          "rejected": [{"role": "assistant", "content": "Bye."}]}]
    pairs += read_pairs(_jsonl(tmp_path / "one.jsonl", rows[2:]))
    for p, row in zip(pairs, rows):
        trl = maybe_apply_chat_template(maybe_extract_prompt(dict(row)), tok)
        want_p = tok(trl["prompt"], add_special_tokens=False)["input_ids"]
        want_c = tok(trl["chosen"], add_special_tokens=False)["input_ids"]
        assert encode_prompts(tok, [p.prompt], 0, True) == [want_p]
        assert encode_responses(tok, [p.prompt], [p.chosen], 10_000, True) == [want_c]
        assert trl["chosen"].endswith("<|im_end|>\n")
    # a string prompt is one user message, as TRL's prompt-only format
    trl = maybe_apply_chat_template({"prompt": [{"role": "user", "content": "the film was"}]}, tok)
    assert encode_prompts(tok, ["the film was"], 0, True) == [tok(trl["prompt"], add_special_tokens=False).input_ids]


def test_chat_template_setting_auto_true_false(caplog):
    from oodpl.config import load_config
    from oodpl.models.tiny import tiny_tokenizer
    from oodpl.models.sampling import encode_prompts

    assert load_config(None).policy.chat_template == "auto"
    assert load_config(None, ["policy.chat_template=true"]).policy.chat_template is True
    with pytest.raises(UserError, match="policy.chat_template"):
        load_config(None, ["policy.chat_template=sometimes"])
    tok = tiny_tokenizer()  # no template
    assert resolve_policy_template("auto", tok, "tiny") is False
    with pytest.raises(UserError, match="policy.chat_template is true but the tokenizer of tiny has no chat template"):
        resolve_policy_template(True, tok, "tiny")
    from oodpl.models import chat

    conv = Conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    chat._said.clear()  # an earlier test may have said it already
    with caplog.at_level(logging.WARNING, logger="oodpl.models.chat"):
        ids = encode_prompts(tok, [conv, conv], 0, False)
        encode_prompts(tok, ["plain text needs no warning"], 0, False)
    assert ids[0] == tok("System: s\n\nUser: q\n\nAssistant:", add_special_tokens=False)["input_ids"]
    warned = [r.getMessage() for r in caplog.records if "policy.chat_template" in r.getMessage()]
    assert len(warned) == 1  # once per process, naming the setting


def test_reward_chat_format_on_a_tokenizer_without_template_is_the_plain_rendering(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from oodpl.config import RewardConfig
    from oodpl.models.reward import RewardModel, load_reward_checkpoint, load_reward_model
    from oodpl.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    assert not tok.chat_template
    rm = load_reward_model(RewardConfig(name_or_path="tiny-random", input_format="chat", max_length=256))
    conv = Conversation(MULTI_TURN[0]["prompt"])
    got = rm.token_ids(conv, "Pear.")
    # [CLS] System: ...\n\nUser: ...\n\nAssistant: Apple.\n\nUser: Another one?\n\nAssistant: Pear. [SEP]
    text = "System: You are terse.\n\nUser: Name a fruit.\n\nAssistant: Apple.\n\nUser: Another one?\n\nAssistant: Pear."
    assert got == [tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert rm.tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    # saved with the tokenizer: plain transformers reproduces the score
    rm.save(tmp_path / "rm")
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    msgs = conv.messages + [{"role": "assistant", "content": "Pear."}]
    inputs = plain_tok.apply_chat_template(msgs, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**inputs).logits[0, 0]
    back = load_reward_checkpoint(tmp_path / "rm", RewardConfig(max_length=256))
    assert back.input_format == "chat"
    torch.testing.assert_close(back.score([conv], ["Pear."])[0], want.float())
    # the default reward model's BERT tokenizer: [CLS] ... [SEP], as tokenizer(text) adds them
    try:
        minilm = load_reward_model(RewardConfig(input_format="chat"))
    except UserError:
        return
    ids = minilm.token_ids("Hi?", "Hello!")
    assert ids == minilm.tokenizer("User: Hi?\n\nAssistant: Hello!")["input_ids"]
    assert isinstance(RewardModel, type)


def test_checkpoint_without_metadata_scored_as_its_tokenizer_allows(tmp_path, caplog):
    from oodpl.config import RewardConfig
    from oodpl.models.reward import REWARD_META, load_reward_checkpoint
    from test_formats import _tiny_seqcls

    model, tok = _tiny_seqcls()  # a tokenizer with a chat template, as a TRL conversational RM has
    model.save_pretrained(tmp_path / "with")
    tok.save_pretrained(tmp_path / "with")
    model.save_pretrained(tmp_path / "backbone")  # a plain backbone (a fresh head): the default format, no guess
    tok.save_pretrained(tmp_path / "backbone")
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    (tmp_path / "backbone" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2Model"]}))
    tok.chat_template = None
    model.save_pretrained(tmp_path / "without")
    tok.save_pretrained(tmp_path / "without")
    with caplog.at_level(logging.INFO, logger="oodpl.models"):
        assert load_reward_checkpoint(tmp_path / "with", RewardConfig()).input_format == "chat"
        assert load_reward_checkpoint(tmp_path / "without", RewardConfig()).input_format == "concat"
        assert load_reward_checkpoint(tmp_path / "backbone", RewardConfig()).input_format == "concat"
    said = [r.getMessage() for r in caplog.records if REWARD_META in r.getMessage()]
    assert len(said) == 2 and "input_format chat" in said[0] and "input_format concat" in said[1]
