"""Scorer backends: gold (VADER lexicon or a local HF classifier) and trained proxy RMs.

Every scorer maps full texts (prompt + response) to one float reward per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.math.ensembles import ensemble, zscore_members
from pipeline_lib.models.loading import load_sequence_classifier, load_tokenizer
from pipeline_lib.settings.sections import GoldSettings


class VaderScorer:
    """VADER compound sentiment score in [-1, 1]; the lexicon ships with ``vaderSentiment``."""

    kind = "gold"

    def __init__(self, name: str = "gold"):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.name = name
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return np.array(
            [self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64
        )


class HFClassifierScorer:
    """A local sequence-classification model directory.

    ``output``: ``logit`` (the label's logit; one-label models return their single logit) or
    ``probability`` (softmax probability of ``label``, e.g. p(POSITIVE | y) as in the vBoN
    sentiment task). ``label`` is an index or a name from the model's ``id2label``.
    """

    def __init__(
        self,
        path: str | Path,
        name: str,
        kind: str,
        label: int | str | None = None,
        output: str = "logit",
        batch_size: int = 128,
        max_length: int = 256,
        device: torch.device | str = "cpu",
        key: str = "gold.path",
    ):
        self.name, self.kind = name, kind
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(path, key)
        self.model = load_sequence_classifier(path, self.device, key)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = self._label_index(label)
        if output not in ("logit", "probability"):
            raise ValueError(f"{key}: output must be 'logit' or 'probability', got {output!r}")
        self.output = output
        self.batch_size, self.max_length = batch_size, max_length

    def _label_index(self, label: int | str | None) -> int:
        n = self.model.config.num_labels
        if label is None:
            return 0 if n == 1 else n - 1
        if isinstance(label, int):
            if not 0 <= label < n:
                raise ValueError(f"label index {label} out of range for a {n}-label model")
            return label
        names = {v: int(k) for k, v in self.model.config.id2label.items()}
        if label not in names:
            raise ValueError(f"label {label!r} not in the model's labels {sorted(names)}")
        return names[label]

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty(len(texts), dtype=np.float64)
        bar = tqdm(total=len(texts), desc=f"score {self.name}", unit="text", mininterval=2.0,
                   disable=len(texts) < 4 * self.batch_size)
        for s in range(0, len(texts), self.batch_size):
            chunk = list(texts[s : s + self.batch_size])
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()
            if self.output == "probability":
                vals = torch.softmax(logits, dim=-1)[:, self.label]
            else:
                vals = logits[:, self.label]
            out[s : s + len(chunk)] = vals.double().cpu().numpy()
            bar.update(len(chunk))
        bar.close()
        return out


def reward_model_scorer(path: str | Path, name: str, device, batch_size: int = 256,
                        max_length: int = 256) -> HFClassifierScorer:
    """A proxy reward model trained by the ``reward_model`` rule (one-logit classifier)."""
    return HFClassifierScorer(
        path, name=name, kind="proxy", label=0, output="logit", batch_size=batch_size,
        max_length=max_length, device=device, key=f"reward model {name}",
    )


def gold_scorer(cfg: GoldSettings, device) -> VaderScorer | HFClassifierScorer:
    """The gold scorer from config section ``gold`` (never one of the proxies)."""
    if cfg.type == "vader":
        return VaderScorer("gold")
    if cfg.type == "hf":
        return HFClassifierScorer(
            cfg.path, name="gold", kind="gold", label=cfg.label,
            output=cfg.output, device=device, key="gold.path",
        )
    raise ValueError(f"config key gold.type: unknown gold scorer {cfg.type!r} (vader, hf)")


class EnsembleProxy:
    """The proxy reward of fresh texts: k reward models combined by the ensemble objective,
    optionally z-normalised with per-member reference statistics (as in the `cdf` stage)."""

    def __init__(self, scorers: Sequence[HFClassifierScorer], objective: str, uwo_lambda: float,
                 stats: tuple[np.ndarray, np.ndarray] | None = None):
        self.scorers, self.objective, self.uwo_lambda, self.stats = (
            list(scorers), objective, uwo_lambda, stats)

    def member_rewards(self, texts: Sequence[str]) -> np.ndarray:
        """(k, N): each member's reward of each text."""
        return np.stack([s.score(texts) for s in self.scorers])

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(N,): the ensemble proxy reward of each text."""
        members = self.member_rewards(texts)
        if self.stats is not None:
            members = zscore_members(members, *self.stats)
        return ensemble(members, self.objective, uwo_lambda=self.uwo_lambda)
