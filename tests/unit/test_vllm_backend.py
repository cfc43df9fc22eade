"""The vLLM backend's adapter logic, against a stand-in `vllm` module (no GPU here).

What is checked: parameters passed to vLLM (n, top_k mapping, seed, token prompts), and the
normalisation of its outputs to the HF backend's convention (final EOS kept once, `finished`).
"""

import sys
import types
from dataclasses import dataclass

import pytest

from pipeline_lib.generation.sampling import SamplingParams
from pipeline_lib.generation.vllm import VLLMBackend
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.errors import ConfigError


@dataclass
class _Completion:
    index: int
    token_ids: list
    finish_reason: str


@dataclass
class _Output:
    outputs: list


class _FakeLLM:
    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, prompts, sp, use_tqdm=False):
        _FakeLLM.calls.append((prompts, sp))
        outs = []
        for p in prompts:
            comps = [
                _Completion(1, [7, 8], "length"),  # out of order, not finished
                _Completion(0, [5, 2], "stop"),  # vLLM returned the EOS (id 2)
            ]
            if len(p["prompt_token_ids"]) > 1:
                comps[1] = _Completion(0, [5], "stop")  # vLLM omitted the EOS
            outs.append(_Output(comps))
        return outs


@pytest.fixture()
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", mod)
    _FakeLLM.calls = []
    return mod


class _Tok:
    eos_token_id = 2


class _Model:
    def eval(self):
        return self


def test_vllm_outputs_follow_the_hf_convention(fake_vllm):
    backend = VLLMBackend("dir", _Tok(), _Model(), "cpu", tensor_parallel_size=2, seed=3)
    assert backend.llm.kwargs["tensor_parallel_size"] == 2
    assert backend.llm.kwargs["trust_remote_code"] is False
    out = backend.sample([[1], [1, 4]], 2, SamplingParams(0.7, 0.9, 0, 16), seed=11)
    prompts, sp = _FakeLLM.calls[0]
    assert prompts == [{"prompt_token_ids": [1]}, {"prompt_token_ids": [1, 4]}]
    # one SamplingParams per prompt: own seed (vLLM's n children then get seed + index), top_k 0
    # = disabled, ids only, explicit stop on the tokenizer's EOS
    assert len(sp) == 2
    for j, params in enumerate(sp):
        assert params == dict(n=2, temperature=0.7, top_p=0.9, top_k=0, max_tokens=16,
                              seed=derive_seed(11, "vllm", j), detokenize=False,
                              stop_token_ids=[2])
    assert sp[0]["seed"] != sp[1]["seed"]
    # the same group seed gives the same per-prompt seeds (reruns reproduce the cache)
    backend.sample([[1], [1, 4]], 2, SamplingParams(0.7, 0.9, 5, 16), seed=11)
    assert [p["seed"] for p in _FakeLLM.calls[1][1]] == [p["seed"] for p in sp]
    assert _FakeLLM.calls[1][1][0]["top_k"] == 5
    for responses in out:
        assert responses[0].token_ids == [5, 2] and responses[0].finished
        assert responses[1].token_ids == [7, 8] and not responses[1].finished


def test_vllm_missing_is_a_config_error():
    if "vllm" in sys.modules or __import__("importlib").util.find_spec("vllm"):
        pytest.skip("vLLM is installed here")
    with pytest.raises(ConfigError, match=r"pip install -e '.\[gpu\]'"):
        validate_config({"task": "t", "seed": 0, "generation": {"backend": "vllm"}})


def test_vllm_config_errors_name_the_key():
    base = {"task": "t", "seed": 0}
    with pytest.raises(ConfigError, match=r"generation.temperature \(2.5\).*at most 2"):
        validate_config({**base, "generation": {"backend": "vllm", "temperature": 2.5}})
    # the HF backend has no such limit
    validate_config({**base, "generation": {"backend": "hf", "temperature": 2.5}})
    named = r"'fp8' is not one of(.|\n)*\['vllm'\]\['properties'\]\['dtype'\]"
    with pytest.raises(Exception, match=named):
        validate_config({**base, "generation": {"backend": "hf", "vllm": {"dtype": "fp8"}}})
    cfg = validate_config({**base, "generation": {"backend": "hf"}})
    assert cfg["generation"]["vllm"]["dtype"] == "float32"
