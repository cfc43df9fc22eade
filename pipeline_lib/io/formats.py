"""The four corpus formats as pure functions of one row: which columns a format reads, and the
(prompt, SFT target) it makes of a row (config section ``corpus``; see
:mod:`pipeline_lib.io.corpus` for the sources and the split)."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline_lib.io.conversation import ASSISTANT, HUMAN, messages_to_prompt, prompt_messages
from pipeline_lib.settings.sections import CorpusSettings


class CorpusError(ValueError):
    """The corpus file or its columns are unusable (message names the file and column)."""


def template_columns(template: str) -> list[str]:
    """The columns a ``corpus.template`` names, in order (``{title}``, ``{post}``, ...).

    The template is filled literally with :meth:`str.format_map` (``{{``/``}}`` are braces);
    every slot must name a column."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise CorpusError(f"config key corpus.template: not a valid template: {exc}") from exc
    out: list[str] = []
    for f in fields:
        name = f.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise CorpusError(f"config key corpus.template: slot {{{f}}} must name a column, "
                              "e.g. {post}")
        if name not in out:
            out.append(name)
    return out


def fill_template(template: str, row: Mapping[str, Any]) -> str:
    """``template`` with each ``{column}`` replaced by the row's value (a null value is '').

    Literal: nothing is added or removed around an empty value, so an optional column is best
    placed last (AlpacaFarm: ``{instruction}\\n\\n{input}`` leaves a trailing blank line when
    ``input`` is empty; a prompt is used exactly as filled)."""
    values = {c: "" if row.get(c) is None else str(row[c]) for c in template_columns(template)}
    return template.format_map(values)


def hh_example(conversation: str) -> tuple[str, str | None]:
    """An Anthropic-HH transcript as (prompt, target): the prompt is everything up to and
    including the last ``"\\n\\nAssistant:"``, the target the reply after it, stripped (None
    when empty). A transcript that ends with a Human turn is all prompt (``"\\n\\nAssistant:"``
    appended, target None), as a message list ending with a user turn."""
    if not isinstance(conversation, str):
        raise ValueError(f"expected a transcript string, got {type(conversation).__name__}")
    cut = conversation.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {ASSISTANT.strip()!r} turn in the conversation")
    if conversation.rfind(HUMAN) > cut:
        return conversation.rstrip() + ASSISTANT, None
    end = cut + len(ASSISTANT)
    return conversation[:end], conversation[end:].strip() or None


def messages_example(messages: Sequence[Mapping[str, Any]] | None) -> tuple[str | None, str | None]:
    """A role/content message list as (prompt, target).

    The target is the content of a final assistant turn and the prompt every message before it,
    stored with :func:`~pipeline_lib.io.conversation.messages_to_prompt`; a conversation that
    ends with a user turn is all prompt (target None). A prompt without any user content is
    None (the row is skipped)."""
    if messages is None:
        return None, None
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"expected a list of {{role, content}} messages, got "
                         f"{type(messages).__name__}")
    msgs = []
    for m in messages:
        if not isinstance(m, Mapping) or m.get("role") is None:
            raise ValueError(f"expected {{role, content}} messages, got {m!r}")
        content = m.get("content")
        msgs.append({"role": str(m["role"]), "content": "" if content is None else str(content)})
    target = None
    if msgs and msgs[-1]["role"] == "assistant":
        target = msgs.pop()["content"].strip() or None
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        return None, target
    return messages_to_prompt(msgs), target


def row_example(cfg: CorpusSettings, row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(prompt, SFT target) of one row in format ``corpus.format`` (prompt, hh or messages);
    None parts where the row has none. Raises ValueError for a row in the wrong shape."""
    if cfg.format == "hh":
        return hh_example(row[cfg.chosen_column])
    if cfg.format == "messages":
        return messages_example(row[cfg.messages_column])
    if cfg.format != "prompt":
        raise ValueError(f"row_example does not read format {cfg.format!r}")
    if cfg.template is not None:
        prompt = fill_template(cfg.template, row)
    else:
        value = row[cfg.prompt_column]
        prompt = None if value is None else str(value)
    target = None
    if cfg.target_column is not None and row[cfg.target_column] is not None:
        target = str(row[cfg.target_column])
        target = target if target.strip() else None
    return prompt, target


def prompt_words(prompt: str) -> int:
    """Words of a prompt: of its messages' contents for a conversation (role markers not
    counted), else of the text."""
    return sum(len(m["content"].split()) for m in prompt_messages(prompt))


def format_columns(cfg: CorpusSettings) -> list[tuple[str, str]]:
    """(config key, column) of every column format ``corpus.format`` reads (without
    ``group_column`` and ``filter``)."""
    if cfg.format == "text_prefix":
        return [("corpus.text_column", cfg.text_column)]
    if cfg.format == "hh":
        return [("corpus.chosen_column", cfg.chosen_column)]
    if cfg.format == "messages":
        return [("corpus.messages_column", cfg.messages_column)]
    if cfg.template is not None:
        out = [("corpus.template", c) for c in template_columns(cfg.template)]
    else:
        out = [("corpus.prompt_column", cfg.prompt_column)]
    if cfg.target_column is not None:
        out.append(("corpus.target_column", cfg.target_column))
    return out


def check_columns(cfg: CorpusSettings, columns: Sequence[str], where: str) -> list[str]:
    """Raise :class:`CorpusError` naming ``where``, the config key and the available columns
    when a column the config names is missing; returns the columns to read."""
    named = [*format_columns(cfg),
             *([("corpus.group_column", cfg.group_column)] if cfg.group_column else []),
             *[("corpus.filter", c) for c in (cfg.filter or {})]]
    for key, col in named:
        if col not in columns:
            what = {"corpus.filter": "filter column", "corpus.template": "template column"}
            raise CorpusError(f"{where}: {what.get(key, 'column')} {col!r} (config key {key}) "
                              f"not found; columns are {list(columns)}")
    return list(dict.fromkeys(col for _, col in named))
