"""Scorers as the pipeline uses them, on (prompt, response) pairs.

- concat (the default) gives today's numbers: the classifier on prompt + response;
- template, pair and chat give the documented token sequences (checked id by id against
  sequences built by hand from the tokenizer's pieces);
- one max_length per model: the reward-model trainer and the scorer see identical ids;
- output auto (a one-label model's logit, else the label's probability); a constant scorer
  (probability of a one-label model) is refused naming its config key;
- the gold classifier (label by name or index, independent of batching and padding);
- the ensemble proxy that scores fresh policy samples (a trained seed plus a pretrained member
  loaded by hub id) equals the `cdf` stage's ensemble of the `score` stage's rewards.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline_lib.io.tables import read_polars, read_provenance, write_table
from pipeline_lib.models.loading import load_tokenizer, save_model
from pipeline_lib.models.scorers import (
    HFClassifierScorer,
    PairFormat,
    VaderScorer,
    encode_pairs,
    gold_scorer,
    member_settings,
    reward_model_scorer,
)
from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.sections import (
    CDFSettings,
    GoldSettings,
    RewardModelSettings,
    ScorerSettings,
    Settings,
)
from pipeline_lib.stages.common import StageError
from pipeline_lib.stages.reward_cache import ensemble_rewards, load_proxy
from pipeline_lib.stages.score import run_score
from pipeline_lib.train.reward_model import train_reward_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (for support.tiny_hub)
from support.tiny_hub import (  # noqa: E402
    BUILDERS,
    TinyHub,
    add_to_cache,
    save_tiny,
    tiny_llama_chat,
    use_tiny_hub,
)

PROMPTS = ["a great", "the plot is", "awful", "funny, warm and", "i loved", "boring"]
RESPONSES = [" film", " dull and the acting is bad, so very bad indeed", " mess",
             " beautifully shot", " every minute", " and slow"]
TEXTS = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]
TEMPLATE = "Human: {prompt} Assistant: {response}"


def _scorer(model, name="rm-x", label=None, output="auto", input="concat", template=None,
            max_length=256, key="reward_models.pretrained[0].model") -> ScorerSettings:
    return ScorerSettings(name, str(model), None, False, label, output, input, template,
                          max_length, key)


def _gold(model, label=None, output="auto", input="concat", template=None, max_length=256):
    return GoldSettings("hf", str(model), None, False, label, output, input, template,
                        max_length)


def _rm_settings(**changes) -> RewardModelSettings:
    base = RewardModelSettings(
        seeds=(1,), base="sft", revision=None, trust_remote_code=False, input="concat",
        template=None, pretrained=(), epochs=1, batch_size=3, lr=1e-3, weight_decay=0.0,
        warmup_steps=0, center_coef=0.0, val_fraction=0.0, max_length=96, log_every=1,
        checkpoint_every=0, mixed_precision="no")
    return dataclasses.replace(base, **changes)


def _gpt2_classifier(policy_dir, out, num_labels: int, seed: int, id2label=None):
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
    return _gpt2_classifier(tiny_policy_dir, tmp_path_factory.mktemp("gold") / "clf", 2, 0,
                            {0: "NEGATIVE", 1: "POSITIVE"})


@pytest.fixture(scope="module")
def seed_dir(tiny_policy_dir, tmp_path_factory):
    return _gpt2_classifier(tiny_policy_dir, tmp_path_factory.mktemp("rm") / "rm-seed1", 1, 1)


def _tiny(short: str, path: Path) -> Path:
    build, tokenizer_class = BUILDERS[short]
    return save_tiny(*build(), path, tokenizer_class)


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory):
    """DistilBERT, two labels NEGATIVE/POSITIVE, ``[CLS] a [SEP] b [SEP]``."""
    return _tiny("distilbert", tmp_path_factory.mktemp("distilbert") / "m")


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory):
    """DeBERTa-v2 with one label (a reward model)."""
    return _tiny("deberta", tmp_path_factory.mktemp("deberta") / "m")


@pytest.fixture(scope="module")
def llama_chat_dir(tmp_path_factory):
    """A one-label Llama classifier whose tokenizer has a chat template and, like Llama's,
    adds BOS to a plain text (so the chat path must not add special tokens)."""
    from tokenizers import processors
    from transformers import LlamaForSequenceClassification

    lm, tok = tiny_llama_chat()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    config = lm.config
    config.num_labels = 1
    torch.manual_seed(0)
    return save_tiny(LlamaForSequenceClassification(config), tok,
                     tmp_path_factory.mktemp("llama") / "m")


def _logits(path, texts, **tok_kwargs):
    """The model's logits of each text, one text at a time (no padding at all; truncation,
    when asked, from the left as the scorers truncate)."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(path)
    tok.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return np.stack([model(**tok(t, return_tensors="pt", **tok_kwargs)).logits[0]
                         .double().numpy() for t in texts])


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class _SeenIds:
    """Records the unpadded input ids each forward of a model reads."""

    def __init__(self, model):
        self.rows: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
        self.rows += [row[m].tolist() for row, m in zip(ids, mask, strict=True)]

    def close(self):
        self.handle.remove()


# --------------------------------------------------------------------------------------------
# Input formats
# --------------------------------------------------------------------------------------------
def test_concat_gives_todays_numbers(sentiment_dir, seed_dir):
    """Today: the classifier on the text prompt + response, truncated at max_length."""
    logits = _logits(sentiment_dir, TEXTS)
    gold = gold_scorer(_gold(sentiment_dir, "POSITIVE", "probability"), "cpu")
    np.testing.assert_allclose(gold.score(PROMPTS, RESPONSES), _softmax(logits)[:, 1], atol=1e-6)
    seed = reward_model_scorer(_rm_settings().seed_scorer(1, str(seed_dir)), "cpu")
    np.testing.assert_allclose(seed.score(PROMPTS, RESPONSES), _logits(seed_dir, TEXTS)[:, 0],
                               atol=1e-5)
    vader = VaderScorer()
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    want = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in TEXTS]
    np.testing.assert_allclose(vader.score(PROMPTS, RESPONSES), want)


@pytest.mark.parametrize("input, template", [("concat", None), ("template", "{prompt} => {response}"),
                                             ("pair", None)])
def test_a_long_prompt_loses_its_beginning_never_the_response(seed_dir, input, template):
    """Truncation keeps the end: the response a reward model must judge survives any prompt."""
    tok = load_tokenizer(seed_dir)
    fmt = PairFormat(input, template, 12, "reward_models")
    prompt, response = " ".join(["a great film"] * 20), " truly awful"
    ids = encode_pairs(tok, [prompt], [response], fmt)["input_ids"][0]
    assert len(ids) == 12
    assert tok.decode(ids).endswith(response) or tok.decode(ids).rstrip().endswith(
        response.strip())
    assert tok.truncation_side == "right"  # the tokenizer is left as it was


def test_concat_truncates_at_the_models_max_length(sentiment_dir):
    short = gold_scorer(_gold(sentiment_dir, 1, "logit", max_length=4), "cpu")
    want = _logits(sentiment_dir, TEXTS, truncation=True, max_length=4)[:, 1]
    np.testing.assert_allclose(short.score(PROMPTS, RESPONSES), want, atol=1e-5)
    assert not np.allclose(want, _logits(sentiment_dir, TEXTS)[:, 1])  # it did truncate


def _seen_by_scorer(settings: ScorerSettings, prompts, responses, batch_size=4):
    scorer = HFClassifierScorer(settings, "proxy", "cpu", batch_size=batch_size)
    seen = _SeenIds(scorer.model)
    scorer.score(prompts, responses)
    seen.close()
    return scorer.tokenizer, seen


def test_template_reads_the_filled_template_with_the_tokenizers_special_tokens(distilbert_dir):
    tok, seen = _seen_by_scorer(_scorer(distilbert_dir, input="template", template=TEMPLATE),
                                PROMPTS, RESPONSES)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    want = [[tok.cls_token_id, *ids(f"Human: {p} Assistant: {r}"), tok.sep_token_id]
            for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert seen.rows == want
    assert ids("Human:")[0] == tok.convert_tokens_to_ids("human")  # the template's own words


def test_pair_reads_the_tokenizers_text_pair(distilbert_dir):
    tok, seen = _seen_by_scorer(_scorer(distilbert_dir, input="pair"), PROMPTS, RESPONSES)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert seen.rows == [[cls, *ids(p), sep, *ids(r), sep]
                         for p, r in zip(PROMPTS, RESPONSES, strict=True)]


def test_chat_reads_the_chat_template_without_added_special_tokens(llama_chat_dir):
    hh = "\n\nHuman: hello there\n\nAssistant: hi, how can I help?\n\nHuman: a good movie?" \
         "\n\nAssistant:"
    prompts, responses = ["a great film", hh], [" I loved it", "funny and warm"]
    tok, seen = _seen_by_scorer(_scorer(llama_chat_dir, input="chat"), prompts, responses)

    def turn(role, text):
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"

    rendered = [turn("user", "a great film") + turn("assistant", " I loved it"),
                turn("user", "hello there") + turn("assistant", "hi, how can I help?")
                + turn("user", "a good movie?") + turn("assistant", "funny and warm")]
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in rendered]
    assert seen.rows == want
    assert all(row[0] == tok.convert_tokens_to_ids("<|im_start|>") for row in seen.rows)
    assert tok.bos_token_id not in seen.rows[0]  # the template places its own markers
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # which a plain text would get


def test_chat_needs_a_chat_template(distilbert_dir):
    with pytest.raises(ValueError, match=r"config key reward_models.pretrained\[0\].input is "
                                         "chat but the tokenizer of .* has no chat template"):
        HFClassifierScorer(_scorer(distilbert_dir, input="chat"), "proxy")


@pytest.mark.parametrize("template, message", [
    (None, r"gold.template is required with gold.input .template."),
    ("{prompt} says", r"gold.template must contain \{response\}"),
    ("{prompt} {answer}", r"gold.template names slot \{answer\}"),
    ("{prompt {response}", r"gold.template: "),
])
def test_bad_templates_are_refused_naming_the_key(template, message):
    with pytest.raises(ValueError, match=f"config key {message}"):
        PairFormat("template", template, 16, "gold")


def test_a_template_without_input_template_is_refused():
    with pytest.raises(ValueError, match="reward_models.template is set but reward_models.input "
                                         "is 'pair'"):
        PairFormat.of(_rm_settings(input="pair", template=TEMPLATE))


# --------------------------------------------------------------------------------------------
# One max_length, the same in training and scoring
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input, template", [("pair", None), ("template", TEMPLATE),
                                             ("concat", None)])
def test_the_trainer_and_the_scorer_read_identical_ids(distilbert_dir, tmp_path, input,
                                                       template):
    from transformers import AutoModelForSequenceClassification

    cfg = _rm_settings(input=input, template=template, max_length=9, epochs=1, batch_size=3)
    tok = load_tokenizer(distilbert_dir)
    model = AutoModelForSequenceClassification.from_pretrained(distilbert_dir, num_labels=1,
                                                               ignore_mismatched_sizes=True)
    chosen, rejected = RESPONSES, RESPONSES[::-1]
    seen = _SeenIds(model)
    train_reward_model(model, tok, chosen, rejected, cfg, "cpu", seed=0, prompts=PROMPTS)
    seen.close()
    save_model(model, tok, tmp_path / "rm-seed1")
    _, scored = _seen_by_scorer(cfg.seed_scorer(1, str(tmp_path / "rm-seed1")),
                                PROMPTS + PROMPTS, chosen + rejected, batch_size=5)
    assert sorted(seen.rows) == sorted(scored.rows)
    assert max(len(r) for r in scored.rows) == 9  # the long pair was truncated to max_length
    fmt = PairFormat.of(cfg)
    want = encode_pairs(tok, PROMPTS + PROMPTS, chosen + rejected, fmt)["input_ids"]
    assert scored.rows == want


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def test_output_auto_is_the_logit_of_one_label_and_the_probability_of_several(
        distilbert_dir, deberta_dir):
    two = _logits(distilbert_dir, TEXTS)
    auto = HFClassifierScorer(_scorer(distilbert_dir), "proxy")
    assert auto.output == "probability"
    np.testing.assert_allclose(auto.score(PROMPTS, RESPONSES), _softmax(two)[:, 1], atol=1e-6)
    negative = HFClassifierScorer(_scorer(distilbert_dir, label="NEGATIVE"), "proxy")
    np.testing.assert_allclose(negative.score(PROMPTS, RESPONSES), _softmax(two)[:, 0],
                               atol=1e-6)
    logit = HFClassifierScorer(_scorer(distilbert_dir, label=0, output="logit"), "proxy")
    np.testing.assert_allclose(logit.score(PROMPTS, RESPONSES), two[:, 0], atol=1e-5)
    one = HFClassifierScorer(_scorer(deberta_dir), "proxy")
    assert one.output == "logit"
    np.testing.assert_allclose(one.score(PROMPTS, RESPONSES), _logits(deberta_dir, TEXTS)[:, 0],
                               atol=1e-5)


def test_a_constant_scorer_is_refused_naming_the_key(deberta_dir):
    with pytest.raises(ValueError, match=r"config key reward_models.pretrained\[0\].output: "
                                         "'probability' of the one-label model .* is 1.0 for "
                                         "every text"):
        HFClassifierScorer(_scorer(deberta_dir, output="probability"), "proxy")
    with pytest.raises(ValueError, match=r"config key gold.output: 'probability' of the one-label"):
        gold_scorer(_gold(deberta_dir, output="probability"), "cpu")


def test_gold_label_by_name_probability_and_logit(sentiment_dir):
    logits = _logits(sentiment_dir, TEXTS)  # one text at a time: no padding at all
    prob = _softmax(logits)
    by_name = gold_scorer(_gold(sentiment_dir, "POSITIVE", "probability"), "cpu")
    np.testing.assert_allclose(by_name.score(PROMPTS, RESPONSES), prob[:, 1], atol=1e-6)
    negative = gold_scorer(_gold(sentiment_dir, "NEGATIVE", "probability"), "cpu")
    np.testing.assert_allclose(negative.score(PROMPTS, RESPONSES), prob[:, 0], atol=1e-6)
    by_index = gold_scorer(_gold(sentiment_dir, 1, "logit"), "cpu")
    np.testing.assert_allclose(by_index.score(PROMPTS, RESPONSES), logits[:, 1], atol=1e-5)
    default = gold_scorer(_gold(sentiment_dir, None, "logit"), "cpu")
    np.testing.assert_allclose(default.score(PROMPTS, RESPONSES), logits[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="config key gold.label: 'positive' is not a label of "
                                         ".*; its labels are 0: NEGATIVE, 1: POSITIVE"):
        gold_scorer(_gold(sentiment_dir, "positive", "logit"), "cpu")


@pytest.mark.parametrize("batch_size", [1, 2, 4, 6])
def test_scores_do_not_depend_on_batching_or_padding(sentiment_dir, batch_size):
    settings = _gold(sentiment_dir, "POSITIVE", "logit").scorer
    one = HFClassifierScorer(settings, "gold", batch_size=1)
    batched = HFClassifierScorer(settings, "gold", batch_size=batch_size)
    np.testing.assert_allclose(batched.score(PROMPTS, RESPONSES), one.score(PROMPTS, RESPONSES),
                               atol=1e-5)
    np.testing.assert_allclose(one.score(PROMPTS, RESPONSES),
                               _logits(sentiment_dir, TEXTS)[:, 1], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Members and the ensemble proxy
# --------------------------------------------------------------------------------------------
def test_members_are_the_seeds_then_the_pretrained_sorted_by_name(tmp_path):
    from pipeline_lib.settings.sections import PretrainedRewardModel

    deb = PretrainedRewardModel("deb", "org/deb", "v2", False, None, "auto", "pair", None, 64)
    rm = _rm_settings(seeds=(1, 2), pretrained=(deb,), input="template", template=TEMPLATE,
                      max_length=12)
    assert rm.member_names() == ["rm-seed1", "rm-seed2", "rm-deb"]
    members = member_settings(rm, {"rm-seed2": tmp_path / "b", "rm-seed1": tmp_path / "a"})
    assert [m.name for m in members] == ["rm-deb", "rm-seed1", "rm-seed2"]
    deb_s, seed1 = members[0], members[1]
    assert (deb_s.model, deb_s.revision, deb_s.input, deb_s.max_length) == ("org/deb", "v2",
                                                                          "pair", 64)
    assert (seed1.model, seed1.input, seed1.template, seed1.max_length, seed1.output) == (
        str(tmp_path / "a"), "template", TEMPLATE, 12, "logit")
    clash = dataclasses.replace(deb, name="seed1")
    with pytest.raises(ValueError, match="member rm-seed1 is also a trained seed"):
        member_settings(dataclasses.replace(rm, pretrained=(clash,)), {"rm-seed1": "x"})


def _samples(prompts, responses) -> pl.DataFrame:
    n = len(prompts)
    return pl.DataFrame({
        "prompt_id": [f"p{i // 3}" for i in range(n)], "sample_idx": [i % 3 for i in range(n)],
        "prompt": prompts, "response": responses, "response_token_ids": [[1, 2]] * n,
        "n_tokens": [2] * n, "finished": [True] * n, "ref_logprob": [-1.0] * n,
        "strategy": ["random"] * n, "layer": [0] * n, "parent_idx": [-1] * n})


def test_the_ppo_proxy_equals_the_cdf_stages_ensemble_of_a_seed_and_a_pretrained_member(
        config, seed_dir, deberta_dir, tmp_path, monkeypatch):
    """rm-seed1 (a trained seed's directory, read as reward_models says) and rm-deb (a
    pretrained reward model by hub id, its text pair): the `score` stage's reward cache, its
    ensemble in the `cdf` stage, and load_proxy's EnsembleProxy on the same pairs agree, for
    every objective, with and without z-normalisation."""
    home = tmp_path / "hf"
    add_to_cache(home / "hub", "tiny-random/deberta-v3-reward", deberta_dir)
    use_tiny_hub(TinyHub(home, home / "hub"), monkeypatch)
    config["reward_models"].update(
        seeds=[1], input="template", template=TEMPLATE, max_length=12,
        pretrained=[{"name": "deb", "model": "tiny-random/deberta-v3-reward", "input": "pair",
                     "max_length": 16}])
    s = Settings.from_config(validate_config(config))
    seeds = {"rm-seed1": seed_dir}
    train_pairs = (PROMPTS[::-1], RESPONSES[::-1])
    for split, (prompts, responses) in {"train": train_pairs, "test": (PROMPTS, RESPONSES)}.items():
        write_table(_samples(prompts, responses), tmp_path / f"{split}-samples.parquet", "samples")
        run_score(s, split, tmp_path / f"{split}-samples.parquet", seeds,
                  tmp_path / f"{split}.parquet")
    train = read_polars(tmp_path / "train.parquet", "rewards")
    test = read_polars(tmp_path / "test.parquet", "rewards")
    assert sorted(test["scorer"].unique()) == ["gold", "rm-deb", "rm-seed1"]
    assert read_provenance(tmp_path / "test.parquet")["reward_models"] == {
        "rm-deb": "tiny-random/deberta-v3-reward", "rm-seed1": str(seed_dir)}
    seed_rewards = test.filter(pl.col("scorer") == "rm-seed1").sort("prompt_id", "sample_idx")
    texts = [TEMPLATE.format(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES,
                                                                    strict=True)]
    np.testing.assert_allclose(seed_rewards["reward"].to_numpy(),  # read as reward_models says
                               _logits(seed_dir, texts, truncation=True, max_length=12)[:, 0],
                               atol=1e-5)
    for objective in ("mean", "wco", "uwo"):
        for normalize in (False, True):
            cfg = CDFSettings(objective=objective, uwo_lambda=0.7, normalize=normalize,
                              curvefit=False)
            want = ensemble_rewards(test, cfg, "test", norm_reference=train).sort(
                "prompt_id", "sample_idx")["proxy"]
            proxy = load_proxy(cfg, s.reward_models, s.scoring.batch_size, seeds,
                               tmp_path / "train.parquet", "cpu")
            assert proxy.names == ["rm-deb", "rm-seed1"]
            np.testing.assert_allclose(proxy.score(PROMPTS, RESPONSES), want.to_numpy(),
                                       rtol=1e-6, atol=1e-6)


def test_an_ensemble_of_pretrained_members_only(config, deberta_dir, distilbert_dir, tmp_path):
    """reward_models.seeds may be empty: the ensemble is the pretrained members alone."""
    config["reward_models"].update(seeds=[], pretrained=[
        {"name": "deb", "model": str(deberta_dir), "input": "pair"},
        {"name": "bert", "model": str(distilbert_dir), "label": "POSITIVE"}])
    s = Settings.from_config(validate_config(config))
    cfg = CDFSettings(objective="mean", uwo_lambda=0.5, normalize=False, curvefit=False)
    proxy = load_proxy(cfg, s.reward_models, 4, {}, None, "cpu")
    assert proxy.names == ["rm-bert", "rm-deb"]
    bert = _softmax(_logits(distilbert_dir, TEXTS))[:, 1]
    tok = load_tokenizer(deberta_dir)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(deberta_dir).eval()
    with torch.no_grad():
        deb = np.array([float(model(**tok(p, r, return_tensors="pt")).logits[0, 0])
                        for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    np.testing.assert_allclose(proxy.score(PROMPTS, RESPONSES), (bert + deb) / 2, atol=1e-5)
    with pytest.raises(StageError, match="the proxy ensemble has no members"):
        load_proxy(cfg, dataclasses.replace(s.reward_models, pretrained=()), 4, {}, None, "cpu")


def _preferences(n: int = 6) -> pl.DataFrame:
    return pl.DataFrame({
        "pair_id": list(range(n)), "prompt_id": [f"pref-{i}" for i in range(n)],
        "prompt": PROMPTS[:n], "chosen": RESPONSES[:n], "rejected": RESPONSES[::-1][:n],
        "chosen_gold": [1.0] * n, "rejected_gold": [0.0] * n, "flipped": [False] * n})


def test_a_seed_trained_from_another_base_is_saved_with_its_tokenizer(config, deberta_dir,
                                                                      tmp_path, monkeypatch):
    """reward_models.base by hub id: the seed starts from that model (no SFT policy given),
    saves the base's tokenizer with it and scores pairs as it was trained (text pair,
    reward_models.max_length)."""
    from pipeline_lib.stages.reward_model import run_reward_model

    home = tmp_path / "hf"
    add_to_cache(home / "hub", "tiny-random/deberta-v3-reward", deberta_dir)
    use_tiny_hub(TinyHub(home, home / "hub"), monkeypatch)
    config["reward_models"].update(base="tiny-random/deberta-v3-reward", seeds=[3], epochs=1,
                                   batch_size=3, input="pair", max_length=10)
    write_table(_preferences(), tmp_path / "preferences.parquet", "preferences")
    out = tmp_path / "rm-seed3"
    run_reward_model(config, 3, tmp_path / "preferences.parquet", None, out,
                     tmp_path / "rm-seed3.parquet")
    base_tok, saved_tok = load_tokenizer(deberta_dir), load_tokenizer(out)
    assert saved_tok(PROMPTS, RESPONSES)["input_ids"] == base_tok(PROMPTS, RESPONSES)["input_ids"]
    prov = read_provenance(tmp_path / "rm-seed3.parquet")
    assert "tiny-random/deberta-v3-reward" in prov["init"]
    assert (prov["input"], prov["max_length"]) == ("pair", 10)
    s = Settings.from_config(config)
    tok, seen = _seen_by_scorer(s.reward_models.seed_scorer(3, str(out)), PROMPTS, RESPONSES)
    assert seen.rows == encode_pairs(base_tok, PROMPTS, RESPONSES,
                                     PairFormat("pair", None, 10))["input_ids"]
    assert max(len(r) for r in seen.rows) == 10
