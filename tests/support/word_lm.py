"""A word-level tokenizer over 16 letters and tiny random GPT-2 policies on it, for trainer
tests that need real models small enough for many optimisation steps on one CPU thread."""

from __future__ import annotations

import torch

WORDS = list("abcdefghijklmnop")
PROMPTS = ["a b", "c d e", "f", "g h i j", "k l", "m n o p", "a c e", "b d f"]


def word_tokenizer():
    """19 tokens: EOS (also BOS) 0, pad 1, unk 2 and the 16 letters; decodes words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<pad>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<unk>",
    )


def tiny_gpt2(tok, n_layer: int = 1, seed: int = 0):
    """A randomly initialised GPT-2 (width 32) in eval mode; ``seed`` fixes its weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()
