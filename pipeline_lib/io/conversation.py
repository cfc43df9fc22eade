"""Conversations as prompt texts: the one plain-text form every table stores.

A prompt is a string in every table (prompts, samples, pairs). A single user turn is stored as
its content alone. A longer conversation is stored as an Anthropic-HH transcript: turns
``"\n\nHuman: …"`` / ``"\n\nAssistant: …"`` (``"System: …"`` first when there is a system
message), ending in ``"\n\nAssistant:"`` where the reply goes. :func:`prompt_messages` reads either
form back as role/content messages, for chat templates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

HUMAN, ASSISTANT, SYSTEM = "\n\nHuman:", "\n\nAssistant:", "System:"
_ROLES = {"user": HUMAN, "assistant": ASSISTANT}
_TURN = re.compile(r"\n\n(Human|Assistant):")


class ConversationError(ValueError):
    """A conversation that cannot be a prompt (message names the problem)."""


def messages_to_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The stored prompt of ``messages`` (which end with a user turn)."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not msgs or msgs[-1]["role"] != "user":
        raise ConversationError("a prompt's messages must end with a user turn")
    if len(msgs) == 1:
        return msgs[0]["content"]
    parts = []
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            if i:
                raise ConversationError("a system message must come first")
            parts.append(f"{SYSTEM} {m['content']}")
        elif m["role"] in _ROLES:
            parts.append(f"{_ROLES[m['role']]} {m['content']}")
        else:
            raise ConversationError(f"unknown role {m['role']!r} (system, user, assistant)")
    return "".join(parts) + ASSISTANT


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The messages of a stored prompt: one user turn, or the turns of an HH transcript (the
    trailing empty ``Assistant:`` dropped)."""
    pieces = _TURN.split(prompt)
    if len(pieces) == 1:
        return [{"role": "user", "content": prompt}]
    head, rest = pieces[0], pieces[1:]
    messages = []
    if head.startswith(SYSTEM):
        messages.append({"role": "system", "content": head[len(SYSTEM):].strip()})
    elif head.strip():
        messages.append({"role": "user", "content": head.strip()})
    for role, content in zip(rest[0::2], rest[1::2], strict=True):
        messages.append({"role": "user" if role == "Human" else "assistant",
                         "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages
