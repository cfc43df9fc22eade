"""One definition of π and π_ref: the sampling distribution (temperature, top-k, top-p).

``pipeline_lib.math.logprobs`` against transformers' own warpers (same tokens kept, ties and the
top-p boundary included) and against brute force; bitwise identity with ``log_softmax`` at the
defaults; and every place a log-prob is taken (the cache's reference log-probs, evaluation,
PPO, the preference trainer) at temperature 0.7 against the tempered distribution, with KL
checked against a brute-force KL of the tempered next-token distributions.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline_lib.generation.hf import HFBackend, sequence_logprobs
from pipeline_lib.generation.sampling import SamplingParams
from pipeline_lib.math.kl import kl_k1, kl_k3
from pipeline_lib.math.logprobs import sampling_logits, sampling_logprobs
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.models.loading import build_scratch_policy, load_tokenizer
from pipeline_lib.train.ppo.config import PPOConfig
from pipeline_lib.train.ppo.policy import PolicyWithValueHead
from pipeline_lib.train.ppo.rollout import make_batch, score_rollout
from pipeline_lib.train.preference_objective import PreferenceConfig, policy_logprobs

T = 0.7


def hf_warped(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """transformers' sampling warpers in generate's order (temperature, top-k, top-p)."""
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        procs.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return procs(torch.zeros((logits.shape[0], 1), dtype=torch.long), logits)


SETTINGS = [(1.0, 1.0, 0), (T, 1.0, 0), (1.0, 0.9, 0), (1.0, 1.0, 5), (T, 0.8, 0),
            (1.3, 0.5, 7), (T, 0.95, 3), (1.0, 0.3, 1), (2.0, 0.999, 0)]


@pytest.mark.parametrize("temperature,top_p,top_k", SETTINGS)
def test_warped_logits_equal_transformers(temperature, top_p, top_k) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    # rows with ties (integer logits): top-k keeps every token tied with the k-th
    logits[:16] = torch.randint(-3, 3, (16, 50), generator=g).float()
    want = hf_warped(logits.clone(), temperature, top_p, top_k)
    got = sampling_logits(logits, temperature, top_p, top_k)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got, want)
    # and on a (B, T, V) layout as the log-prob code uses it
    got3 = sampling_logits(logits.view(8, 8, 50), temperature, top_p, top_k)
    assert torch.equal(got3.view(64, 50), want)


def brute_force(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """Sampling probabilities of one row, from the definitions, in float64."""
    z = logits / temperature
    keep = np.ones(z.size, dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(p, kind="stable")  # ascending; no ties in this test
        cum = np.cumsum(p[order])
        drop = cum <= 1 - top_p
        drop[-1] = False
        keep[order[drop]] = False
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", SETTINGS)
def test_logprobs_equal_brute_force(temperature, top_p, top_k) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 12, generator=g, dtype=torch.float64) * 2
    for row in logits:
        want = brute_force(row.numpy(), temperature, top_p, top_k)
        for tok in range(12):
            got = float(sampling_logprobs(row, torch.tensor(tok), temperature, top_p, top_k))
            if want[tok] == 0:
                assert got == -np.inf
            else:
                assert got == pytest.approx(np.log(want[tok]), abs=1e-12)


def test_defaults_are_bitwise_log_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 9, 101, generator=g) * 4
    tokens = torch.randint(0, 101, (3, 9), generator=g)
    want = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(sampling_logprobs(logits, tokens), want)
    assert torch.equal(sampling_logprobs(logits, tokens, 1.0, 1.0, 0, keep_tokens=True), want)


def test_outside_the_support_is_minus_inf_and_the_kl_infinite_not_nan() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    tail = torch.tensor([3])
    lp = sampling_logprobs(logits, tail, 1.0, 0.9, 0)
    assert lp.item() == -np.inf  # the nucleus of mass 0.9 excludes the tail
    kept = sampling_logprobs(logits, tail, 1.0, 0.9, 0, keep_tokens=True)
    assert np.isfinite(kept.item())  # the distribution's own sample: always in its support
    assert kl_k1(kept, lp).item() == np.inf and kl_k3(kept, lp).item() == np.inf
    with pytest.raises(ValueError, match="top_p"):
        sampling_logits(logits, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        sampling_logits(logits, 0.0, 1.0, 0)


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tok(tiny_policy_dir):
    return load_tokenizer(tiny_policy_dir)


def peaky(tok, seed: int):
    torch.manual_seed(seed)
    model = build_scratch_policy(tok, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    with torch.no_grad():  # a next-token distribution far from uniform: temperature matters
        model.transformer.ln_f.weight.mul_(6.0)
    return model.eval()


def next_token_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1].double()


def brute_sequence_logprob(model, prompt, response, temperature) -> float:
    """Σ_t log softmax(logits_t / T)[y_t], one prefix at a time (float64)."""
    total = 0.0
    for t, y in enumerate(response):
        logits = next_token_logits(model, list(prompt) + list(response[:t]))
        total += float(torch.log_softmax(logits / temperature, -1)[y])
    return total


def _prompts_and_responses(tok) -> tuple[list[list[int]], list[list[int]]]:
    """Three encoded prompts and hand-picked responses of 1 to 4 tokens."""
    prompts = [encode_prompt(tok, p) for p in ("a great film", "the plot", "it was")]
    return prompts, [[5, 9, 14], [7], [3, 3, 20, 11]]


def test_sequence_logprobs_are_those_of_the_tempered_distribution(tok) -> None:
    model = peaky(tok, 0)
    prompts, responses = _prompts_and_responses(tok)
    got = sequence_logprobs(model, prompts, responses, tok.pad_token_id,
                            params=SamplingParams(temperature=T))
    want = [brute_sequence_logprob(model, p, r, T) for p, r in zip(prompts, responses,
                                                                     strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
    assert not np.allclose(plain, want, atol=1e-2)  # temperature 1 is another quantity


def test_cache_reference_logprobs_at_temperature(tok) -> None:
    """The samples table's ref_logprob (generate_table) is log π_ref at the sampling T."""
    import polars as pl

    from pipeline_lib.stages.generate import generate_table

    model = peaky(tok, 1)
    backend = HFBackend(model, tok, "cpu")
    prompts = pl.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["a great film", "the plot"]})
    g = SimpleNamespace(temperature=T, top_p=1.0, top_k=0, max_new_tokens=4, batch_size=8)
    table = generate_table(backend, prompts, None, 3, g, 0, "train")
    for row in table.iter_rows(named=True):
        want = brute_sequence_logprob(model, encode_prompt(tok, row["prompt"]),
                                      row["response_token_ids"], T)
        assert row["ref_logprob"] == pytest.approx(want, abs=1e-4)


def test_top_p_cache_logprobs_are_finite_and_truncated(tok) -> None:
    """Under top-p the cache's own samples keep finite log-probs, renormalised on the nucleus."""
    import polars as pl

    from pipeline_lib.stages.generate import generate_table

    model = peaky(tok, 2)
    backend = HFBackend(model, tok, "cpu")
    prompts = pl.DataFrame({"prompt_id": ["p0"], "prompt": ["a great film"]})
    g = SimpleNamespace(temperature=T, top_p=0.8, top_k=0, max_new_tokens=1, batch_size=64)
    table = generate_table(backend, prompts, None, 40, g, 0, "train")
    probs = brute_force(next_token_logits(model, encode_prompt(tok, "a great film")).numpy(),
                        T, 0.8, 0)
    for row in table.iter_rows(named=True):
        (y,) = row["response_token_ids"]
        assert probs[y] > 0
        assert row["ref_logprob"] == pytest.approx(np.log(probs[y]), abs=1e-4)


def test_kl_of_one_token_responses_is_the_tempered_kl(tok) -> None:
    """E_{y~π_T}[log π_T(y) - log π_ref,T(y)] over every one-token response, with both
    log-probs from sequence_logprobs, equals KL(π_T ‖ π_ref,T) computed from the logits."""
    pol, ref = peaky(tok, 3), peaky(tok, 4)
    prompt = encode_prompt(tok, "a great film")
    vocab = pol.config.vocab_size
    params = SamplingParams(temperature=T)
    responses = [[v] for v in range(vocab)]
    lp = sequence_logprobs(pol, [prompt] * vocab, responses, tok.pad_token_id, params=params)
    lr = sequence_logprobs(ref, [prompt] * vocab, responses, tok.pad_token_id, params=params)
    p = torch.softmax(next_token_logits(pol, prompt) / T, -1).numpy()
    q = torch.softmax(next_token_logits(ref, prompt) / T, -1).numpy()
    kl_true = float(np.sum(p * (np.log(p) - np.log(q))))
    assert float(np.sum(p * kl_k1(lp, lr))) == pytest.approx(kl_true, rel=1e-4)
    assert float(np.sum(p * kl_k3(lp, lr))) == pytest.approx(kl_true, rel=1e-3)
    p1 = torch.softmax(next_token_logits(pol, prompt), -1).numpy()
    q1 = torch.softmax(next_token_logits(ref, prompt), -1).numpy()
    assert abs(float(np.sum(p1 * (np.log(p1) - np.log(q1)))) - kl_true) > 1e-2


def test_ppo_rollout_logprobs_and_kl_at_temperature(tok) -> None:
    """The PPO rollout's old and reference log-probs are the tempered ones (the same numbers as
    the cache and the evaluation), and k1 of π_ref against itself is 0."""
    model = peaky(tok, 5)
    policy = PolicyWithValueHead(model)
    ref = copy.deepcopy(model)
    prompts = [encode_prompt(tok, p) for p in ("a great film", "the plot")]
    responses = [[5, 9, 14], [7, 2]]
    batch = make_batch(prompts, responses, tok.pad_token_id)
    cfg = PPOConfig(steps=1, rollout_batch_size=2, minibatch_size=2, temperature=T)
    acc = SimpleNamespace(autocast=contextlib.nullcontext)
    with torch.no_grad():
        old, _, ref_lp, _ = score_rollout(policy, ref, batch, cfg, 2, acc)
    assert torch.equal(old, ref_lp)  # k1 = 0 at step 0
    seq = ((old * batch.mask).sum(1)).double().numpy()
    want = sequence_logprobs(model, prompts, responses, tok.pad_token_id,
                             params=SamplingParams(temperature=T))
    np.testing.assert_allclose(seq, want, rtol=1e-5, atol=1e-5)


def test_preference_policy_logprobs_match_the_cache_at_temperature(tok) -> None:
    """h = log π - ref_logprob is 0 at step 0 at T != 1 (BoNBoN/DPO/IPO's reference)."""
    model = peaky(tok, 6)
    prompts, responses = _prompts_and_responses(tok)
    cached = sequence_logprobs(model, prompts, responses, tok.pad_token_id,
                               params=SamplingParams(temperature=T))
    with torch.no_grad():
        got = policy_logprobs(model, prompts, responses, tok.pad_token_id, temperature=T)
    np.testing.assert_allclose(got.double().numpy(), cached, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = policy_logprobs(model, prompts, responses, tok.pad_token_id)
    want = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
    np.testing.assert_allclose(plain.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_trainers_refuse_truncated_sampling() -> None:
    for kw in ({"top_p": 0.9}, {"top_k": 40}):
        with pytest.raises(ValueError, match="infinite"):
            PPOConfig(steps=1, rollout_batch_size=2, minibatch_size=2, **kw)
        with pytest.raises(ValueError, match="-inf"):
            PreferenceConfig("dpo", **kw)
    PPOConfig(steps=1, rollout_batch_size=2, minibatch_size=2, temperature=T)
    PreferenceConfig("bonbon", temperature=T)


def test_summary_records_the_sampling_distribution(config, tmp_path) -> None:
    """Every summary row (policies and BoN points) names the T / top-p / top-k its KL is of."""
    import polars as pl

    from pipeline_lib.io.tables import write_table
    from pipeline_lib.settings.sections import Settings
    from pipeline_lib.stages.budget import BUDGET_COLUMNS, BUDGET_TYPES
    from pipeline_lib.stages.generate import sampling_columns
    from pipeline_lib.stages.reward_cache import configured_objective_name
    from pipeline_lib.stages.summary import summary_table

    config = {**config, "generation": {**config["generation"], "temperature": T}}
    s = Settings.from_config(config)
    row = pl.DataFrame([{
        "policy": "sft", "method": "sft", "beta": None, "n": None, "gold": 0.1, "gold_se": 0.01,
        "proxy": 0.2, "kl": 0.0, "kl_se": 0.0, "kl_estimator": "k1", "kl_k3": 0.0,
        "win_rate_ref": 0.5, "win_rate_bon": 0.2, "win_rate_n": 4, "win_rate_judges": 2,
        "pareto": False, "sweep": None, "seed": None, **dict.fromkeys(BUDGET_COLUMNS),
        **sampling_columns(s)}],
        schema_overrides={"beta": pl.Float64, "n": pl.Int32, "win_rate_n": pl.Int32,
                          "win_rate_judges": pl.Int32, "top_k": pl.Int32, "sweep": pl.String,
                          "seed": pl.Int32, **BUDGET_TYPES})
    write_table(row, tmp_path / "sft.parquet", "eval_summary", {})
    objective = configured_objective_name(s.cdf, s.evaluation.uwo_lambdas)
    bon = pl.DataFrame({"objective": [objective] * 2, "n": [1, 4], "proxy": [0.2, 0.4],
                        "gold": [0.1, 0.3], "kl_analytic": [0.0, 0.64], "kl_ties": [0.0, 0.6],
                        "win_rate_ref": [0.5, 0.8], "win_rate_judges": [2, 2],
                        "n_prompts": [3, 3], "pool_size": [8, 8]},
                       schema_overrides={"n": pl.Int32, "win_rate_judges": pl.Int32,
                                         "n_prompts": pl.Int32, "pool_size": pl.Int32})
    write_table(bon, tmp_path / "bon.parquet", "bon_curve", {})
    table = summary_table(config, [tmp_path / "sft.parquet"], tmp_path / "bon.parquet")
    assert table.height == 3
    assert table["temperature"].to_list() == [T] * 3
    assert table["top_p"].to_list() == [1.0] * 3 and table["top_k"].to_list() == [0] * 3
