"""Prompt encoding: the one function every stage uses to turn a prompt text into token ids."""

from __future__ import annotations


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: BOS (when the tokenizer has one) + the text, no EOS.

    The same convention is used when training (BOS + text + EOS), sampling and scoring
    log-probabilities, so that a prompt conditions the policy exactly as in training.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids
