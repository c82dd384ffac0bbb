"""How prompts (data.conversation: a str or a Conversation) become the policy's and the reward model's tokens.

- with a chat template (policy.chat_template true, or auto and the tokenizer has one): the prompt is TRL's
  `maybe_apply_chat_template({"prompt": messages})["prompt"]` (generation prompt added) and a human response is the
  completion TRL cuts from prompt + [assistant message] (so it ends in the template's end-of-turn, e.g.
  `<|im_end|>\\n`), each tokenised without special tokens: the token ids TRL's trainers use. A string prompt is one
  user message.
- without one: the plain rendering (`plain_text`): a single user message is its content; anything else is
  "Role: content" turns joined by blank lines, ending with "Assistant:" when the last turn is not the assistant's
  (hh-rlhf's layout).

Reward models with `reward.input_format: chat` whose tokenizer has no template get `PLAIN_CHAT_TEMPLATE` (the same
plain rendering between the tokenizer's [CLS]/[SEP] or BOS/EOS), the way TRL's `chat_template_path` gives one; it is
saved with the reward model's tokenizer, so plain transformers reproduces the scores.
"""

from __future__ import annotations

import logging
from typing import Any

from oodpl.data.conversation import Conversation, messages_of
from oodpl.errors import UserError

log = logging.getLogger(__name__)

# The plain rendering as a Jinja chat template, for tokenizers without one (e.g. all-MiniLM-L6-v2's BERT tokenizer):
# [CLS] System: ...\n\nUser: ...\n\nAssistant: ... [SEP]  (BOS / EOS where the tokenizer has no CLS / SEP).
# (newlines as expressions: transformers renders templates with trim_blocks, which eats a newline after a tag)
PLAIN_CHAT_TEMPLATE = (
    "{{ cls_token or bos_token or '' }}"
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['role'] | capitalize }}: "
    "{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% else %}{{ sep_token or eos_token or '' }}{% endif %}"
)


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_policy_template(setting: Any, tokenizer, model_name: str) -> bool:
    """policy.chat_template -> whether prompts go through the tokenizer's template: auto = when it has one; true
    without a template is an error (never a silent fall-back to raw text)."""
    if setting == "auto":
        return has_template(tokenizer)
    if setting is True and not has_template(tokenizer):
        raise UserError(f"policy.chat_template is true but the tokenizer of {model_name} has no chat template; set "
                        "policy.chat_template to auto or false (prompts as plain text), or use a chat model")
    return bool(setting)


_said: set[str] = set()


def warn_once(message: str) -> None:
    """A warning printed once per process (the same message from every batch would drown the progress bars)."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


def _templated(tokenizer, example: dict) -> dict:
    from trl.data_utils import maybe_apply_chat_template

    return maybe_apply_chat_template(example, tokenizer)


def prompt_ids(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """Token ids of one policy prompt (before truncation)."""
    if chat_template:
        text = _templated(tokenizer, {"prompt": messages_of(prompt)})["prompt"]
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, Conversation):
        warn_once("the data is conversational but the policy renders prompts as plain text (policy.chat_template is "
                  "false, or auto with a tokenizer that has no chat template); set policy.chat_template: true for a "
                  "chat model")
    ids = tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return list(ids)


def response_ids(tokenizer, prompt: str, response: str, chat_template: bool) -> list[int]:
    """Token ids of one human-written response to `prompt` (before truncation); under the chat template, TRL's
    completion text (the assistant turn and the template's end of turn)."""
    if chat_template:
        example = {"prompt": messages_of(prompt), "completion": [{"role": "assistant", "content": response}]}
        text = _templated(tokenizer, example)["completion"]
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    p = str(prompt)
    if p and response and not p[-1].isspace() and not response[0].isspace():
        response = " " + response  # a separating space where the text needs one
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def reward_chat_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """The reward model's input under input_format chat: the template over the prompt's messages and the response as
    an assistant message, as TRL's RewardTrainer tokenises conversational data."""
    ensure_reward_template(tokenizer, getattr(tokenizer, "name_or_path", "") or "in memory")
    out = tokenizer.apply_chat_template(messages_of(prompt) + [{"role": "assistant", "content": response}],
                                        tokenize=True, return_dict=True)
    return list(out["input_ids"])


def ensure_reward_template(tokenizer, source: str) -> None:
    """Give a reward-model tokenizer without a chat template the plain one (said once per tokenizer)."""
    if not has_template(tokenizer):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        log.info("reward model %s: its tokenizer has no chat template; input_format chat uses oodpl's plain "
                 "rendering (PLAIN_CHAT_TEMPLATE, saved with the tokenizer)", source)
