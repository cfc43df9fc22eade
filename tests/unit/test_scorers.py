"""Scorers as the pipeline uses them: the gold classifier (label by name or index, probability
vs logit, independent of batching and padding) and the ensemble proxy that scores fresh policy
samples, which must equal the `cdf` stage's ensemble of the same texts."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from pipeline_lib.io.tables import write_table
from pipeline_lib.models.loading import load_tokenizer, save_model
from pipeline_lib.models.scorers import HFClassifierScorer, gold_scorer, reward_model_scorer
from pipeline_lib.settings.sections import CDFSettings, GoldSettings
from pipeline_lib.stages.reward_cache import ensemble_rewards, load_proxy

TEXTS = ["a great film", "the plot is dull and the acting is bad, so very bad indeed", "awful",
         "funny, warm and beautifully shot", "i loved every minute", "boring"]


def _classifier(policy_dir, out, num_labels: int, seed: int, id2label=None):
    from transformers import GPT2ForSequenceClassification

    tok = load_tokenizer(policy_dir)
    torch.manual_seed(seed)
    labels = ({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
              if id2label else {})
    model = GPT2ForSequenceClassification.from_pretrained(policy_dir, num_labels=num_labels,
                                                          **labels)
    model.config.pad_token_id = tok.pad_token_id
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="module")
def sentiment_dir(tiny_policy_dir, tmp_path_factory):
    return _classifier(tiny_policy_dir, tmp_path_factory.mktemp("gold") / "clf", 2, 0,
                       {0: "NEGATIVE", 1: "POSITIVE"})


@pytest.fixture(scope="module")
def reward_dirs(tiny_policy_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return {f"rm-seed{s}": _classifier(tiny_policy_dir, root / f"rm{s}", 1, s) for s in (1, 2, 3)}


def _logits(path, texts):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return np.stack([model(**tok(t, return_tensors="pt")).logits[0].double().numpy()
                         for t in texts])


def test_gold_label_by_name_probability_and_logit(sentiment_dir):
    logits = _logits(sentiment_dir, TEXTS)  # one text at a time: no padding at all
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    by_name = gold_scorer(GoldSettings("hf", str(sentiment_dir), "POSITIVE", "probability"), "cpu")
    np.testing.assert_allclose(by_name.score(TEXTS), prob[:, 1], atol=1e-6)
    negative = gold_scorer(GoldSettings("hf", str(sentiment_dir), "NEGATIVE", "probability"),
                           "cpu")
    np.testing.assert_allclose(negative.score(TEXTS), prob[:, 0], atol=1e-6)
    by_index = gold_scorer(GoldSettings("hf", str(sentiment_dir), 1, "logit"), "cpu")
    np.testing.assert_allclose(by_index.score(TEXTS), logits[:, 1], atol=1e-5)
    default = gold_scorer(GoldSettings("hf", str(sentiment_dir), None, "logit"), "cpu")
    np.testing.assert_allclose(default.score(TEXTS), logits[:, 1], atol=1e-5)  # the last label
    with pytest.raises(ValueError, match="not in the model's labels"):
        gold_scorer(GoldSettings("hf", str(sentiment_dir), "positive", "logit"), "cpu")


@pytest.mark.parametrize("batch_size", [1, 2, 4, 6])
def test_scores_do_not_depend_on_batching_or_padding(sentiment_dir, batch_size):
    one = HFClassifierScorer(sentiment_dir, "gold", "gold", label="POSITIVE", batch_size=1)
    batched = HFClassifierScorer(sentiment_dir, "gold", "gold", label="POSITIVE",
                                 batch_size=batch_size)
    np.testing.assert_allclose(batched.score(TEXTS), one.score(TEXTS), atol=1e-5)
    np.testing.assert_allclose(one.score(TEXTS), _logits(sentiment_dir, TEXTS)[:, 1], atol=1e-5)


def _reward_cache(reward_dirs, texts) -> pl.DataFrame:
    """The long reward cache the `score` stage writes for ``texts`` (one prompt, M samples)."""
    keys = {"prompt_id": ["train-00000"] * len(texts), "sample_idx": list(range(len(texts)))}
    frames = [pl.DataFrame({**keys, "scorer": name, "kind": "proxy",
                            "reward": reward_model_scorer(path, name, "cpu").score(texts)})
              for name, path in reward_dirs.items()]
    return pl.concat(frames).with_columns(pl.col("sample_idx").cast(pl.Int32))


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
@pytest.mark.parametrize("normalize", [False, True])
def test_the_ppo_proxy_equals_the_cdf_stages_ensemble(reward_dirs, tmp_path, objective,
                                                      normalize):
    cfg = CDFSettings(objective=objective, uwo_lambda=0.7, normalize=normalize, curvefit=False)
    train = _reward_cache(reward_dirs, TEXTS[::-1])  # the normalisation reference
    write_table(train, tmp_path / "train.parquet", "rewards", {})
    cache = _reward_cache(reward_dirs, TEXTS)
    want = ensemble_rewards(cache, cfg, "test", norm_reference=train).sort("sample_idx")["proxy"]
    proxy = load_proxy(cfg, 2, reward_dirs, tmp_path / "train.parquet", "cpu")
    np.testing.assert_allclose(proxy.score(TEXTS), want.to_numpy(), rtol=1e-6, atol=1e-6)
