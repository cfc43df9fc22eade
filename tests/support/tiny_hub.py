"""Tiny random models of the seed papers' architectures, in a Hugging Face hub cache built at
test time, so tests load them **by hub id** with ``HF_HUB_OFFLINE=1`` and no network.

The models (random weights, 1-2 layers, hidden size 32, vocabularies of a few hundred tokens,
each with a working fast tokenizer trained here with ``tokenizers``):

======================  =========================================================================
hub id                  what it is
======================  =========================================================================
``tiny-random/gpt2``     GPT-2 causal LM; byte-level BPE, ``<|endoftext|>`` as BOS/EOS, no pad
                         token. Tag ``v1`` (``TinyHub.commits[id]["v1"]``) is another commit:
                         a 1-layer model (main has 2 layers).
``tiny-random/pythia``   GPTNeoX (Pythia) causal LM; byte-level BPE, ``<|endoftext|>`` as
                         BOS/EOS, ``<|padding|>`` as pad (GPTNeoXTokenizer's, as in Pythia).
``tiny-random/llama-chat``  Llama causal LM with a chat template (``<|im_start|>role ...
                         <|im_end|>``); EOS ``<|im_end|>``, its generation config lists two EOS
                         ids (``<|im_end|>``, ``</s>``); no pad token.
``tiny-random/distilbert-sst2``  DistilBERT sequence classifier, labels 0 NEGATIVE, 1 POSITIVE;
                         WordPiece with ``[CLS] a [SEP] b [SEP]`` pairs.
``tiny-random/deberta-v3-reward``  DeBERTa-v2 sequence classifier with one label (a reward
                         model, like OpenAssistant's); Unigram with ``[CLS]``/``[SEP]``.
======================  =========================================================================

The cache is laid out as ``huggingface_hub`` lays it out
(``<cache>/models--org--name/{blobs/<hash>, refs/<ref>, snapshots/<40-hex commit>/<file>}``, the
snapshot files being relative symlinks to the blobs), so ``snapshot_download(id,
local_files_only=True)`` and ``AutoModel.from_pretrained(id)`` find it like a real download.

Use in tests:

- ``tiny_hub`` (function fixture): the cache, with ``HF_HOME``/``HF_HUB_CACHE``/
  ``HF_HUB_OFFLINE=1`` set for the test (environment and ``huggingface_hub.constants``) and
  ``pipeline_lib.models.hub``'s per-process caches cleared; returns a :class:`TinyHub`
  (``tiny_hub.ids["gpt2"] == "tiny-random/gpt2"``, ``tiny_hub.commits``, ``tiny_hub.cache``)::

      def test_x(tiny_hub):
          tok = load_tokenizer(ModelRef(tiny_hub.ids["llama"], key="policy.base"))

- ``tiny_hub_cache`` (session fixture): the same :class:`TinyHub`, built once per session,
  with nothing set; for subprocesses (a Snakemake DAG) pass ``env={**os.environ,
  **tiny_hub_cache.env()}``.
- Outside pytest: ``build_tiny_hub(home)``; ``add_to_cache(cache, repo_id, model_dir)`` places
  any saved model directory in a hub-layout cache under a hub id (e.g. a real model for an
  end-to-end run of the hub-id path).

The fixtures are registered for every test by ``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline_lib.models.hub import add_to_cache  # noqa: E402 (re-exported for the tests)

ORG = "tiny-random"
IDS = {
    "gpt2": f"{ORG}/gpt2",
    "pythia": f"{ORG}/pythia",
    "llama": f"{ORG}/llama-chat",
    "distilbert": f"{ORG}/distilbert-sst2",
    "deberta": f"{ORG}/deberta-v3-reward",
}

TEXTS = [
    "a great film with a wonderful cast",
    "the plot is dull and the acting is bad",
    "an awful mess of a movie",
    "funny, warm and beautifully shot",
    "Human: what is a good movie?\n\nAssistant: I loved this story.",
    "Summarize the post. TL;DR: the worst film of the year",
    "user: hello there! assistant: hi, how can I help you today?",
    "Instruction: write a short review. Input: a charming comedy. Response: delightful.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HIDDEN = 32


@dataclass(frozen=True)
class TinyHub:
    """A hub-layout cache of the tiny models: ``home`` (``HF_HOME``), ``cache``
    (``HF_HUB_CACHE`` = ``home/hub``), ``ids`` (short name -> hub id, see the module docstring)
    and ``commits`` (hub id -> {ref: commit hash})."""

    home: Path
    cache: Path
    ids: Mapping[str, str] = field(default_factory=dict)
    commits: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The environment that points ``huggingface_hub``/``transformers`` at this cache,
        offline (for a subprocess)."""
        return {"HF_HOME": str(self.home), "HF_HUB_CACHE": str(self.cache),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --------------------------------------------------------------------------------------------
# Tokenizers (tokenizers library, wrapped as transformers fast tokenizers)
# --------------------------------------------------------------------------------------------
def _byte_level_bpe(specials: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def _bert_pair_processor(tok, cls: str, sep: str):
    from tokenizers import processors

    ids = [(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    return processors.TemplateProcessing(single=f"{cls} $A {sep}",
                                         pair=f"{cls} $A {sep} $B:1 {sep}:1",
                                         special_tokens=ids)


def gpt2_tokenizer():
    """GPT-2 style: byte-level BPE, ``<|endoftext|>`` as BOS, EOS and UNK, no pad token."""
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe([eot]), bos_token=eot,
                                   eos_token=eot, unk_token=eot, model_max_length=128)


def pythia_tokenizer():
    """Pythia (GPT-NeoX) style: byte-level BPE with ``<|endoftext|>`` (BOS, EOS, UNK) and
    ``<|padding|>`` in its vocabulary, which GPTNeoXTokenizer uses as its pad token."""
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe([eot, "<|padding|>"]),
                                   bos_token=eot, eos_token=eot, unk_token=eot,
                                   model_max_length=128)


def llama_chat_tokenizer():
    """Llama-3/SmolLM2 style chat tokenizer: byte-level BPE, BOS ``<s>`` (not added: the chat
    template places its own markers), EOS ``<|im_end|>``, a chat template, no pad."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(specials), bos_token="<s>",
                                  eos_token="<|im_end|>", unk_token="</s>",
                                  additional_special_tokens=["<|im_start|>"],
                                  model_max_length=128)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def distilbert_tokenizer():
    """DistilBERT/BERT style: lower-cased WordPiece, ``[CLS] a [SEP] b [SEP]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False))
    tok.post_processor = _bert_pair_processor(tok, "[CLS]", "[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=128)


def deberta_tokenizer():
    """DeBERTa-v3 style: a Unigram (sentencepiece-like, ``▁`` word marker) tokenizer with
    ``[CLS] a [SEP] b [SEP]``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=specials, unk_token="[UNK]", show_progress=False))
    tok.post_processor = _bert_pair_processor(tok, "[CLS]", "[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[CLS]", eos_token="[SEP]", model_max_length=128)


# --------------------------------------------------------------------------------------------
# Models (random weights, seeded)
# --------------------------------------------------------------------------------------------
def _special_ids(tok) -> dict[str, int | None]:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def tiny_gpt2(seed: int = 0, n_layer: int = 2):
    """(GPT2LMHeadModel, tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=HIDDEN, n_layer=n_layer,
                        n_head=2, **_special_ids(tok))
    return GPT2LMHeadModel(config), tok


def tiny_pythia(seed: int = 0, n_layer: int = 2):
    """(GPTNeoXForCausalLM, tokenizer), Pythia's shape: rotary on a quarter of each head,
    parallel residual, untied output embedding."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = pythia_tokenizer()
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=n_layer,
                           num_attention_heads=2, intermediate_size=4 * HIDDEN,
                           max_position_embeddings=128, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False,
                           **_special_ids(tok))
    return GPTNeoXForCausalLM(config), tok


def tiny_llama_chat(seed: int = 0):
    """(LlamaForCausalLM, tokenizer with a chat template); the generation config lists two EOS
    ids (``<|im_end|>``, ``</s>``) as chat models do."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = llama_chat_tokenizer()
    torch.manual_seed(seed)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("</s>")]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                         eos_token_id=eos, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                               do_sample=True, temperature=1.0, top_p=1.0)
    return model, tok


def tiny_distilbert(seed: int = 0):
    """(DistilBertForSequenceClassification with labels NEGATIVE/POSITIVE, tokenizer)."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tok = distilbert_tokenizer()
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(tok), dim=HIDDEN, hidden_dim=2 * HIDDEN, n_layers=2,
                              n_heads=2, max_position_embeddings=128,
                              id2label={0: "NEGATIVE", 1: "POSITIVE"},
                              label2id={"NEGATIVE": 0, "POSITIVE": 1},
                              pad_token_id=tok.pad_token_id)
    return DistilBertForSequenceClassification(config), tok


def tiny_deberta_reward(seed: int = 0):
    """(DebertaV2ForSequenceClassification with one label, tokenizer): a reward model."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = deberta_tokenizer()
    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=2 * HIDDEN,
                             max_position_embeddings=128, relative_attention=True,
                             position_buckets=16, pos_att_type=["p2c", "c2p"],
                             num_labels=1, pad_token_id=tok.pad_token_id)
    return DebertaV2ForSequenceClassification(config), tok


# --------------------------------------------------------------------------------------------
# The hub cache layout
# --------------------------------------------------------------------------------------------
def fake_commit(repo_id: str, label: str) -> str:
    """A deterministic 40-hex commit hash for ``repo_id`` at ``label``."""
    return hashlib.sha1(f"{repo_id}@{label}".encode()).hexdigest()


def save_tiny(model, tok, path: str | Path, tokenizer_class: str | None = None) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer into ``path``; with
    ``tokenizer_class``, the tokenizer config names that class (as the real repos do), which
    ``AutoTokenizer`` then builds from the saved ``tokenizer.json``."""
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if tokenizer_class is not None:
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = tokenizer_class
        config_file.write_text(json.dumps(config, indent=2))
    return path


# short name -> (builder, tokenizer class named in the tokenizer config: the real repos' class
# where transformers builds it unchanged from our tokenizer.json; None: the generic fast
# tokenizer, as Llama-3's repos name it)
BUILDERS = {
    "gpt2": (tiny_gpt2, "GPT2Tokenizer"),
    "pythia": (tiny_pythia, "GPTNeoXTokenizer"),
    "llama": (tiny_llama_chat, None),
    "distilbert": (tiny_distilbert, "DistilBertTokenizer"),
    "deberta": (tiny_deberta_reward, None),
}


def build_tiny_hub(home: str | Path) -> TinyHub:
    """Build every tiny model into the hub cache ``home/hub`` (``HF_HOME`` = ``home``)."""
    home = Path(home)
    cache = home / "hub"
    commits: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for short, (build, tokenizer_class) in BUILDERS.items():
            repo_id = IDS[short]
            path = save_tiny(*build(), Path(tmp) / short, tokenizer_class)
            commit = add_to_cache(cache, repo_id, path, ("main",), fake_commit(repo_id, "main"))
            commits[repo_id] = {"main": commit}
        # a second commit of the GPT-2 repo, tagged v1: one layer, other weights
        repo_id = IDS["gpt2"]
        path = save_tiny(*tiny_gpt2(seed=1, n_layer=1), Path(tmp) / "gpt2-v1", "GPT2Tokenizer")
        commits[repo_id]["v1"] = add_to_cache(cache, repo_id, path, ("v1",),
                                              fake_commit(repo_id, "v1"))
    return TinyHub(home=home, cache=cache, ids=dict(IDS), commits=commits)


def use_tiny_hub(hub: TinyHub, monkeypatch) -> TinyHub:
    """Point ``huggingface_hub``/``transformers`` at ``hub``'s cache, offline, for one test
    (the environment for subprocesses and ``huggingface_hub.constants`` for this process,
    which reads the environment once at import), and clear pipeline_lib's model caches."""
    from huggingface_hub import constants

    from pipeline_lib.models import hub as model_hub

    for k, v in hub.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HOME", str(hub.home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model_hub.clear_model_caches()
    return hub


@pytest.fixture(scope="session")
def tiny_hub_cache(tmp_path_factory) -> TinyHub:
    """The tiny models' hub cache, built once per session (nothing set; see ``tiny_hub``)."""
    return build_tiny_hub(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture()
def tiny_hub(tiny_hub_cache, monkeypatch) -> Iterable[TinyHub]:
    """The tiny models' hub cache, set as this test's Hugging Face cache, offline."""
    from pipeline_lib.models import hub as model_hub

    yield use_tiny_hub(tiny_hub_cache, monkeypatch)
    model_hub.clear_model_caches()
