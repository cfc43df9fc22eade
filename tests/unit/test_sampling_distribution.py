"""Both generation backends draw from the policy's own next-token distribution.

One prompt, M samples of one token each: the counts of the first token are compared with the
exact distribution from the policy's logits (tempered, then top-k / top-p filtered) by a
chi-square goodness-of-fit test. The same counts against a wrong distribution (untempered or
unfiltered) must be rejected, so each case can fail. The policy's final layer-norm gain is
scaled up so that its next-token distribution is far from uniform and temperature matters.

The HF backend runs everywhere. The vLLM backend runs only where vLLM and a CUDA GPU are
present (``bash setup.sh --gpu``, then ``pytest -m gpu``); elsewhere it is skipped.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline_lib.generation.hf import HFBackend
from pipeline_lib.generation.sampling import SamplingParams
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.models.loading import (
    build_scratch_policy,
    load_causal_lm,
    load_tokenizer,
    save_model,
)

M = 4000
ALPHA = 1e-4  # a correct sampler fails one case in 10,000 runs

HAS_VLLM_GPU = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
needs_vllm_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs vLLM and a CUDA GPU (bash setup.sh --gpu)"),
]


def exact_next_token(model, prompt: list[int], temperature: float, top_k: int, top_p: float,
                     device) -> np.ndarray:
    """The sampling distribution of the next token: softmax(logits / T), then top-k, then
    top-p (the smallest head of the sorted distribution with mass >= top_p), renormalised."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt], device=device)).logits[0, -1]
    p = torch.softmax(logits.double() / temperature, dim=-1).cpu().numpy()
    order = np.argsort(-p, kind="stable")
    keep = np.ones(len(p), dtype=bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        mass_before = np.cumsum(q[order]) - q[order]
        keep[order[mass_before >= top_p]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def chi_square_p(counts: Counter, probs: np.ndarray, m: int) -> float:
    """Goodness-of-fit p-value; tokens expected fewer than 5 times are pooled into one bin."""
    expected = probs * m
    big = np.flatnonzero(expected >= 5)
    observed = np.array([counts.get(int(t), 0) for t in big], dtype=float)
    rest_obs = m - observed.sum()
    rest_exp = m - expected[big].sum()
    if rest_exp > 1e-9 or rest_obs > 0:
        observed = np.append(observed, rest_obs)
        exp = np.append(expected[big], max(rest_exp, 1e-9))
    else:
        exp = expected[big]
    return float(stats.chisquare(observed, exp * (m / exp.sum())).pvalue)


@pytest.fixture(scope="module")
def peaky_policy(tiny_policy_dir, tmp_path_factory):
    tok = load_tokenizer(tiny_policy_dir)
    torch.manual_seed(1)
    # head size 64: every vLLM attention backend supports it
    model = build_scratch_policy(tok, **{"n_positions": 64, "n_embd": 128, "n_layer": 1,
                                       "n_head": 2})
    with torch.no_grad():  # logits × 8: top token ≈ 0.25, a dozen above 1 %
        model.transformer.ln_f.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("peaky") / "policy"
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=needs_vllm_gpu)])
def backend(request, peaky_policy):
    device = "cuda" if request.param == "vllm" else "cpu"
    tok = load_tokenizer(peaky_policy)
    model = load_causal_lm(peaky_policy, device)
    if request.param == "hf":
        yield HFBackend(model, tok, device)
        return
    from pipeline_lib.generation.vllm import VLLMBackend

    b = VLLMBackend(peaky_policy, tok, model, device, gpu_memory_utilization=0.3,
                    dtype="float32", seed=0)
    yield b
    del b.llm


CASES = {
    # name: (temperature, top_k, top_p, wrong distribution's (temperature, top_k, top_p))
    "plain": (1.0, 0, 1.0, (0.5, 0, 1.0)),
    "tempered": (0.6, 0, 1.0, (1.0, 0, 1.0)),
    "top_k": (1.0, 5, 1.0, (1.0, 0, 1.0)),
    "top_p": (1.0, 0, 0.7, (1.0, 0, 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_token_follows_the_policy(backend, case) -> None:
    temperature, top_k, top_p, wrong = CASES[case]
    prompt = encode_prompt(backend.tokenizer, "a great film")
    params = SamplingParams(temperature, top_p, top_k, max_new_tokens=1)
    (responses,) = backend.sample([prompt], M, params, seed=7)
    assert len(responses) == M and all(len(r.token_ids) == 1 for r in responses)
    counts = Counter(r.token_ids[0] for r in responses)

    probs = exact_next_token(backend.model, prompt, temperature, top_k, top_p, backend.device)
    assert probs.max() < 0.9 and (probs > 0.01).sum() >= 3  # a distribution worth testing
    allowed = set(np.flatnonzero(probs > 0).tolist())
    assert set(counts) <= allowed, "sampled a token the filters exclude"
    assert chi_square_p(counts, probs, M) > ALPHA

    wrong_probs = exact_next_token(backend.model, prompt, *wrong, backend.device)
    assert chi_square_p(counts, wrong_probs, M) < ALPHA
