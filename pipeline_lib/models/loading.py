"""Loading and saving Hugging Face models and tokenizers; the scratch GPT-2 policy and its BPE
tokenizer of the default task.

The loaders take a :class:`ModelRef` (a model named in the config: hub id or local directory,
revision, trust_remote_code, config key) or a plain path / hub id, resolve it through
:mod:`pipeline_lib.models.hub` (the Hugging Face cache, offline-safe) and load the resolved
directory with ``local_files_only=True``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline_lib.models.hub import ResolvedModel, as_model_ref, resolve_model
from pipeline_lib.settings.sections import ModelRef

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


ModelSource = ModelRef | str | Path


def resolve_source(source: ModelSource, key: str) -> ResolvedModel:
    """Where a loader reads ``source`` from (:func:`pipeline_lib.models.hub.resolve_model`): a
    :class:`ModelRef` (its own key, revision and trust_remote_code), or a local directory or
    hub id (default revision, no remote code) named by the config key ``key``."""
    return resolve_model(as_model_ref(source, key))


def load_tokenizer(source: ModelSource, key: str = "policy.base"):
    """The tokenizer of a model (:func:`resolve_source`), with a pad token: tokenizers without
    one (GPT-2, Pythia, Llama) pad with their EOS token."""
    from transformers import AutoTokenizer

    m = resolve_source(source, key)
    tok = AutoTokenizer.from_pretrained(m.path, local_files_only=True,
                                        trust_remote_code=m.ref.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(source: ModelSource, device: torch.device | str = "cpu",
                   key: str = "policy.base"):
    """A causal LM (:func:`resolve_source`; safetensors preferred, remote code only when its
    ref allows it) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    m = resolve_source(source, key)
    model = AutoModelForCausalLM.from_pretrained(m.path, local_files_only=True,
                                                 trust_remote_code=m.ref.trust_remote_code)
    return model.to(device).eval()


def load_sequence_classifier(source: ModelSource, device: torch.device | str = "cpu",
                             key: str = "gold.model", **kwargs):
    """A sequence-classification model (:func:`resolve_source`) in eval mode on ``device``;
    ``kwargs`` go to ``from_pretrained`` (e.g. ``num_labels``)."""
    from transformers import AutoModelForSequenceClassification

    m = resolve_source(source, key)
    model = AutoModelForSequenceClassification.from_pretrained(
        m.path, local_files_only=True, trust_remote_code=m.ref.trust_remote_code, **kwargs)
    return model.to(device).eval()


def save_model(model, tokenizer, path: str | Path) -> None:
    """``save_pretrained`` (safetensors) for model and tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
