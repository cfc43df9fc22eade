"""Prompt encoding: the one function every stage uses to turn a prompt text into token ids.

Sampling, reference log-probs, SFT, PPO, the preference trainer and evaluation all call
:func:`encode_prompt`, so a prompt conditions the policy the same way everywhere. Whether the
chat template is used is a property of the policy's tokenizer, decided once when it is loaded
(:func:`apply_chat_setting`, config key ``policy.chat_template``) and saved with every policy.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline_lib.io.conversation import prompt_messages


def uses_chat_template(tokenizer) -> bool:
    """Whether prompts are encoded through the tokenizer's chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_setting(tokenizer, setting: str | bool, key: str = "policy.chat_template"):
    """Apply ``policy.chat_template`` to a policy tokenizer (in place; returned): ``auto``
    keeps its template if it has one, ``false`` removes it, ``true`` requires one."""
    if setting is False or setting == "false":
        tokenizer.chat_template = None
    elif (setting is True or setting == "true") and not uses_chat_template(tokenizer):
        raise ValueError(f"config key {key} is true but the tokenizer has no chat template")
    return tokenizer


def render_prompt(tokenizer, text: str) -> str:
    """The prompt as the model reads it: the chat template with the generation prompt, or the
    text itself."""
    if not uses_chat_template(tokenizer):
        return text
    return tokenizer.apply_chat_template(prompt_messages(text), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, no EOS.

    Without a chat template: BOS (when the tokenizer has one) + the text; the same convention
    is used when training (BOS + text + EOS), sampling and scoring log-probabilities. With one:
    the rendered template (which places its own special tokens), tokenised without adding more.
    """
    chat = uses_chat_template(tokenizer)
    return encode_rendered(tokenizer, render_prompt(tokenizer, text) if chat else text, chat)


def encode_rendered(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt already rendered: a chat-template rendering as it is (it holds
    its special tokens), plain text after BOS."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not chat and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and every EOS id of the model's
    generation config (chat models list several, e.g. end-of-turn and end-of-text)."""
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for v in value if isinstance(value, Iterable) else [value]:
            if int(v) not in ids:
                ids.append(int(v))

    add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        add(gen.eos_token_id)
    return ids


def decode_responses(tokenizer, responses: Iterable[Iterable[int]],
                     eos_ids: Iterable[int]) -> list[str]:
    """Response texts: the ids without EOS ids and special tokens, decoded."""
    stop = set(eos_ids)
    seqs = [[t for t in r if t not in stop] for r in responses]
    if not seqs:  # batch_decode([]) decodes one empty sequence
        return []
    return tokenizer.batch_decode(seqs, skip_special_tokens=True)
