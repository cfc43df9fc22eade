"""Scorer backends: gold (VADER lexicon or a sequence classifier) and the proxy reward models
(trained seeds and pretrained reward models).

Every scorer maps (prompt, response) pairs to one float reward per pair:
``score(prompts, responses) -> np.ndarray``. How a classifier reads a pair is its
:class:`PairFormat` (config keys ``input``, ``template``, ``max_length``), applied by
:func:`encode_pairs`, the one function both scoring and reward-model training tokenise with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.io.conversation import prompt_messages
from pipeline_lib.math.ensembles import ensemble, zscore_members
from pipeline_lib.models.encoding import uses_chat_template
from pipeline_lib.models.labels import config_section, read_output, scorer_label
from pipeline_lib.models.loading import load_sequence_classifier, load_tokenizer
from pipeline_lib.settings.config import check_scorer_input
from pipeline_lib.settings.sections import (
    GoldSettings,
    RewardModelSettings,
    ScorerSettings,
)

INPUTS = ("concat", "template", "pair", "chat")


@dataclass(frozen=True)
class PairFormat:
    """How a sequence classifier reads (prompt, response) (see :func:`encode_pairs`).

    ``input``: ``concat`` (prompt + response as one text), ``template`` (``template`` with
    ``{prompt}`` and ``{response}``), ``pair`` (the tokenizer's text pair) or ``chat`` (the
    tokenizer's chat template, the response as the assistant turn). ``max_length``: tokens read
    (longer inputs are truncated). ``section``: the config section named in errors."""

    input: str = "concat"
    template: str | None = None
    max_length: int = 512
    section: str = "reward_models"

    def __post_init__(self):
        k = self.section
        if self.input not in INPUTS:
            raise ValueError(f"config key {k}.input: unknown input {self.input!r} "
                             f"({', '.join(INPUTS)})")
        if int(self.max_length) < 1:
            raise ValueError(f"config key {k}.max_length must be positive, got {self.max_length}")
        check_scorer_input(k, self.input, self.template)

    @classmethod
    def of(cls, settings: ScorerSettings | RewardModelSettings) -> PairFormat:
        """The format of a scorer's settings, or of the trained seeds (``reward_models``)."""
        if isinstance(settings, RewardModelSettings):
            section = "reward_models"
        else:
            section = config_section(settings.key)
        return cls(settings.input, settings.template, int(settings.max_length), section)


def format_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 fmt: PairFormat) -> tuple[list[str], list[str] | None]:
    """The texts a tokenizer reads for (prompt, response) pairs under ``fmt``: one text per
    pair, and for ``input: pair`` the second texts of the text pairs (else None).

    ``chat`` renders ``prompt_messages(prompt)`` + the response as an assistant turn with the
    tokenizer's chat template (``tokenize=False``)."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if fmt.input == "concat":
        return [p + r for p, r in zip(prompts, responses, strict=True)], None
    if fmt.input == "template":
        return [fmt.template.format(prompt=p, response=r)
                for p, r in zip(prompts, responses, strict=True)], None
    if fmt.input == "pair":
        return prompts, responses
    if not uses_chat_template(tokenizer):
        raise ValueError(f"config key {fmt.section}.input is chat but the model's tokenizer "
                         "has no chat template")
    return [tokenizer.apply_chat_template(
        [*prompt_messages(p), {"role": "assistant", "content": r}], tokenize=False)
        for p, r in zip(prompts, responses, strict=True)], None


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], fmt: PairFormat,
                 **kwargs):
    """Token ids of (prompt, response) pairs as the model reads them, truncated to
    ``fmt.max_length`` (a ``BatchEncoding``); ``kwargs`` (e.g. ``padding``,
    ``return_tensors``) go to the tokenizer.

    ``concat`` and ``template``: the text with the tokenizer's special tokens; ``pair``:
    ``tokenizer(prompts, responses)`` (its pair special tokens; the prompt is truncated);
    ``chat``: the rendered template without adding special tokens (it places its own).

    Truncation cuts from the left: what a reward model must see is the response, at the end,
    so a long prompt loses its beginning rather than the response its end."""
    texts, pairs = format_pairs(tokenizer, prompts, responses, fmt)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        if pairs is not None:  # cut the prompts; the responses too only when they alone overflow
            try:
                return tokenizer(texts, pairs, truncation="only_first",
                                 max_length=fmt.max_length, **kwargs)
            except Exception:  # noqa: BLE001 - the tokenizers. "sequence not long enough"
                return tokenizer(texts, pairs, truncation="longest_first",
                                 max_length=fmt.max_length, **kwargs)
        return tokenizer(texts, truncation=True, max_length=fmt.max_length,
                         add_special_tokens=fmt.input != "chat", **kwargs)
    finally:
        tokenizer.truncation_side = side


class VaderScorer:
    """VADER compound sentiment score in [-1, 1] of prompt + response; the lexicon ships with
    ``vaderSentiment``."""

    kind = "gold"

    def __init__(self, name: str = "gold"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name = name
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        texts, _ = format_pairs(None, prompts, responses, PairFormat(section="gold"))
        return np.array(
            [self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64
        )


class HFClassifierScorer:
    """A sequence-classification model (hub id or local directory) scoring (prompt, response)
    pairs read as its :class:`PairFormat` says.

    ``output``: ``logit`` (the label's logit), ``probability`` (softmax probability of the
    label, e.g. p(POSITIVE | y) as in the vBoN sentiment task) or ``auto`` (a one-label
    model's logit, else the label's probability). ``label`` is an index or a name from the
    model's ``id2label`` (default: the last label)."""

    def __init__(self, settings: ScorerSettings, kind: str, device: torch.device | str = "cpu",
                 batch_size: int = 128):
        self.settings = settings
        self.name, self.kind = settings.name, kind
        self.format = PairFormat.of(settings)
        section = self.format.section
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(settings.ref, settings.key)
        if self.format.input == "chat" and not uses_chat_template(self.tokenizer):
            raise ValueError(f"config key {section}.input is chat but the tokenizer of "
                             f"{settings.model} has no chat template")
        self.model = load_sequence_classifier(settings.ref, self.device, settings.key)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        cfg = self.model.config
        self.label = scorer_label(settings, cfg.num_labels, getattr(cfg, "id2label", None) or {})
        self.output = read_output(settings.output, self.model.config.num_labels, section)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(N,): the score of each (prompt, response) pair."""
        prompts, responses = list(prompts), list(responses)
        out = np.empty(len(prompts), dtype=np.float64)
        bar = tqdm(total=len(prompts), desc=f"score {self.name}", unit="text", mininterval=2.0,
                   disable=len(prompts) < 4 * self.batch_size)
        for s in range(0, len(prompts), self.batch_size):
            e = s + self.batch_size
            enc = encode_pairs(self.tokenizer, prompts[s:e], responses[s:e], self.format,
                               padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            if self.output == "probability":
                vals = torch.softmax(logits, dim=-1)[:, self.label]
            else:
                vals = logits[:, self.label]
            out[s : s + len(vals)] = vals.double().cpu().numpy()
            bar.update(len(vals))
        bar.close()
        return out


def reward_model_scorer(settings: ScorerSettings, device, batch_size: int = 256
                        ) -> HFClassifierScorer:
    """A proxy reward model: a trained seed (:meth:`RewardModelSettings.seed_scorer`) or a
    pretrained member (:meth:`RewardModelSettings.pretrained_scorers`)."""
    return HFClassifierScorer(settings, "proxy", device, batch_size)


def gold_scorer(cfg: GoldSettings, device, batch_size: int = 128
                ) -> VaderScorer | HFClassifierScorer:
    """The gold scorer from config section ``gold`` (never one of the proxies)."""
    if cfg.type == "vader":
        return VaderScorer("gold")
    if cfg.type == "hf":
        if not cfg.model:
            raise ValueError("config key gold.model is required with gold.type: hf")
        return HFClassifierScorer(cfg.scorer, "gold", device, batch_size)
    raise ValueError(f"config key gold.type: unknown gold scorer {cfg.type!r} (vader, hf)")


def member_settings(rm: RewardModelSettings, seed_dirs: Mapping[str, str | Path]
                    ) -> list[ScorerSettings]:
    """The proxy ensemble's members as scorer settings, sorted by name (the order of the
    reward cache's members): the trained seeds in ``seed_dirs`` (member name -> directory, read
    with ``reward_models.input/template/max_length``) and ``reward_models.pretrained``."""
    seeds = [replace(rm.seed_scorer(0, str(path)), name=name, key=f"reward model {name}")
             for name, path in seed_dirs.items()]
    members = seeds + rm.pretrained_scorers()
    names = [m.name for m in members]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"config key reward_models.pretrained: member {dup[0]} is also a "
                         "trained seed or listed twice")
    return sorted(members, key=lambda m: m.name)


class EnsembleProxy:
    """The proxy reward of fresh (prompt, response) pairs: k reward models combined by the
    ensemble objective, optionally z-normalised with per-member reference statistics (as in the
    `cdf` stage)."""

    def __init__(self, scorers: Sequence[HFClassifierScorer], objective: str, uwo_lambda: float,
                 stats: tuple[np.ndarray, np.ndarray] | None = None):
        self.scorers, self.objective, self.uwo_lambda, self.stats = (
            list(scorers), objective, uwo_lambda, stats)

    @property
    def names(self) -> list[str]:
        """The member names, in the order of the normalisation statistics."""
        return [s.name for s in self.scorers]

    def member_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(k, N): each member's reward of each pair."""
        return np.stack([s.score(prompts, responses) for s in self.scorers])

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(N,): the ensemble proxy reward of each pair."""
        members = self.member_rewards(prompts, responses)
        if self.stats is not None:
            members = zscore_members(members, *self.stats)
        return ensemble(members, self.objective, uwo_lambda=self.uwo_lambda)
