"""Loading and saving Hugging Face models and tokenizers; the scratch GPT-2 policy and its BPE
tokenizer of the default task."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

BOS = "<|endoftext|>"


PAD = "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style) with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD, model_max_length=1024
    )


def build_scratch_policy(tokenizer, *, n_positions: int, n_embd: int, n_layer: int,
                         n_head: int):
    """A small GPT-2 initialised from scratch for the trained tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=int(n_positions),
        n_embd=int(n_embd),
        n_layer=int(n_layer),
        n_head=int(n_head),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def _check_model_dir(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} (config key {key}) is not a Hugging Face model directory: no config.json"
        )
    return path


def load_tokenizer(path: str | Path, key: str = "policy.base"):
    """The tokenizer of a local model directory, with a pad token (``key``: the config key named in errors)."""
    from transformers import AutoTokenizer

    path = _check_model_dir(path, key)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu", key: str = "policy.base"):
    """Load a local causal LM (safetensors preferred, no remote code) in eval mode."""
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(path, key)
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=False
    )
    return model.to(device).eval()


def load_sequence_classifier(
    path: str | Path, device: torch.device | str = "cpu", key: str = "gold.path", **kwargs
):
    """A sequence-classification model from a local directory (``key``: the config key named in errors)."""
    from transformers import AutoModelForSequenceClassification

    path = _check_model_dir(path, key)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=True, trust_remote_code=False, **kwargs
    )
    return model.to(device).eval()


def save_model(model, tokenizer, path: str | Path) -> None:
    """``save_pretrained`` (safetensors) for model and tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
