"""Prompts as conversations (TRL's conversational format): a prompt is a `str` or a `Conversation`.

A Conversation is a prompt given as messages ({"role", "content"}: system, user, assistant, tool; any number of
turns). It *is* a str — its plain rendering (`plain_text`) — so everything that treats prompts as text (split keys,
judges, clusters, JSON) keeps working, and it carries `.messages` for the chat template (models.chat turns it into
the policy's and the reward model's tokens).
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def plain_text(messages: list[dict]) -> str:
    """The plain rendering of a prompt conversation (see the module docstring)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return text if messages[-1]["role"] == "assistant" else text + "\n\nAssistant:"


class Conversation(str):
    """A prompt given as messages; the str value is its plain rendering (`plain_text`)."""

    messages: list[dict]

    def __new__(cls, messages: list[dict]):
        msgs = [{"role": str(m["role"]), "content": m["content"]} for m in messages]
        obj = super().__new__(cls, plain_text(msgs))
        obj.messages = msgs
        return obj

    def __reduce__(self):  # pickling / deepcopy keep the messages
        return (Conversation, (self.messages,))

    def __repr__(self) -> str:
        return f"Conversation({self.messages!r})"


def messages_of(prompt: str) -> list[dict]:
    """The prompt as messages: a Conversation's own, a string's one user message."""
    return prompt.messages if isinstance(prompt, Conversation) else [{"role": "user", "content": str(prompt)}]


def to_json(prompt: str) -> Any:
    """JSON form of a prompt: a list of messages for a Conversation, the string otherwise (`from_json` inverts)."""
    return list(prompt.messages) if isinstance(prompt, Conversation) else prompt


def from_json(value: Any) -> str:
    return Conversation(value) if isinstance(value, list) else value
