"""Prompt encoding with and without chat templates, conversation transcripts, and EOS ids."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from pipeline_lib.generation.sampling import response_from_ids, trim_at_eos
from pipeline_lib.io.conversation import ConversationError, messages_to_prompt, prompt_messages
from pipeline_lib.models.encoding import (
    apply_chat_setting,
    decode_responses,
    encode_prompt,
    eos_token_ids,
    render_prompt,
    uses_chat_template,
)
from pipeline_lib.models.loading import train_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def plain_tok():
    texts = ["hello there how are you", "the movie was great", "user assistant system"] * 20
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture
def chat_tok(plain_tok):
    import copy

    tok = copy.deepcopy(plain_tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def test_single_turn_prompt_is_its_content_and_reads_back():
    msgs = [{"role": "user", "content": "How are you?"}]
    assert messages_to_prompt(msgs) == "How are you?"
    assert prompt_messages("How are you?") == msgs


def test_conversation_round_trips_through_an_hh_transcript():
    msgs = [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."}]
    prompt = messages_to_prompt(msgs)
    assert prompt == ("System: Be kind.\n\nHuman: Hi\n\nAssistant: Hello! How can I help?"
                      "\n\nHuman: Tell me a joke.\n\nAssistant:")
    assert prompt_messages(prompt) == msgs


def test_an_anthropic_hh_prompt_reads_as_messages():
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert prompt_messages(prompt) == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize("msgs", [[], [{"role": "assistant", "content": "x"}],
                                  [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"},
                                   {"role": "user", "content": "c"}]])
def test_bad_conversations_are_refused(msgs):
    with pytest.raises(ConversationError):
        messages_to_prompt(msgs)


def test_plain_encoding_is_bos_plus_text(plain_tok):
    ids = encode_prompt(plain_tok, "the movie")
    assert ids == [plain_tok.bos_token_id, *plain_tok("the movie", add_special_tokens=False)["input_ids"]]
    assert not uses_chat_template(plain_tok)


def test_chat_encoding_renders_the_template_once_without_extra_special_tokens(chat_tok):
    rendered = render_prompt(chat_tok, "hello there")
    assert rendered == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(chat_tok, "hello there")
    assert ids == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added on top
    assert ids.count(chat_tok.bos_token_id) == 0


def test_chat_setting(chat_tok, plain_tok):
    import copy

    assert uses_chat_template(apply_chat_setting(copy.deepcopy(chat_tok), "auto"))
    assert uses_chat_template(apply_chat_setting(copy.deepcopy(chat_tok), True))
    off = apply_chat_setting(copy.deepcopy(chat_tok), False)
    assert not uses_chat_template(off)
    assert encode_prompt(off, "hello")[0] == off.bos_token_id
    assert not uses_chat_template(apply_chat_setting(copy.deepcopy(plain_tok), "auto"))
    with pytest.raises(ValueError, match="policy.chat_template"):
        apply_chat_setting(copy.deepcopy(plain_tok), True)


class _Model:
    def __init__(self, eos):
        self.generation_config = GenerationConfig(eos_token_id=eos)


def test_eos_ids_join_the_tokenizer_and_the_generation_config(chat_tok):
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    eos = chat_tok.eos_token_id
    assert eos_token_ids(chat_tok) == [eos]
    assert eos_token_ids(chat_tok, _Model([end, eos])) == [eos, end]
    assert eos_token_ids(chat_tok, _Model(end)) == [eos, end]


def test_responses_stop_at_any_eos_id():
    assert trim_at_eos([5, 9, 7, 8], [8, 9]) == [5, 9]
    assert trim_at_eos([5, 6], [8, 9]) == [5, 6]
    assert response_from_ids([5, 8, 1, 1], [9, 8]).finished
    assert not response_from_ids([5, 6], [9, 8]).finished
    assert not response_from_ids([], [9]).finished


def test_decoded_responses_drop_every_eos(chat_tok):
    end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    ids = chat_tok("hello there", add_special_tokens=False)["input_ids"]
    assert decode_responses(chat_tok, [ids + [end]], [chat_tok.eos_token_id, end]) == \
        [chat_tok.decode(ids)]


def test_no_responses_decode_to_no_texts(chat_tok):
    """An empty sampling shard (all its prompt groups went to the other shards) has none."""
    assert decode_responses(chat_tok, [], [chat_tok.eos_token_id]) == []
