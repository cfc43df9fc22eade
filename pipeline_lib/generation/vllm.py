"""The vLLM backend (GPU extra): same samples as the HF backend's interface, seeded per prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline_lib.generation.sampling import Response, SamplingParams
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.encoding import eos_token_ids


class VLLMBackend:
    """Sampling with vLLM (GPU, the `gpu` extra); reference log-probs still come from the HF
    model (``self.model``) through :func:`sequence_logprobs`, so both backends write the same
    ``samples`` table.

    Responses are normalised to the HF backend's convention: generated ids including the final
    EOS when generation stopped on it (vLLM versions differ in whether they return it).
    """

    name = "vllm"

    def __init__(self, model_dir, tokenizer, hf_model, device, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, dtype: str = "auto", seed: int = 0):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "config key generation.backend is 'vllm' but vLLM is not installed; install "
                "the GPU extra: pip install -e '.[gpu]' (or bash setup.sh --gpu)"
            ) from exc
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.model = hf_model.eval()
        self.device = torch.device(device)
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir),
                            tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                            seed=seed, trust_remote_code=False)

    def sample(
        self, prompt_ids: Sequence[Sequence[int]], m: int, params: SamplingParams, seed: int
    ) -> list[list[Response]]:
        """``m`` responses per prompt. Each prompt gets its own seed (vLLM gives the ``n``
        children of a request ``seed + index``), so prompts of a group do not share random
        streams; stopping on the tokenizer's EOS is explicit, as in the HF backend."""
        vllm = self._vllm
        eos_ids = eos_token_ids(self.tokenizer, self.model)
        sp = [
            vllm.SamplingParams(
                n=m, temperature=params.temperature, top_p=params.top_p,
                top_k=max(params.top_k, 0), max_tokens=params.max_new_tokens,
                seed=derive_seed(seed, "vllm", j), detokenize=False,
                stop_token_ids=eos_ids,
            )
            for j in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, sp, use_tqdm=False)
        result = []
        for out in outputs:
            responses = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                finished = comp.finish_reason == "stop"
                if finished and eos_ids and (not ids or ids[-1] not in eos_ids):
                    # a stop on EOS may leave it out of token_ids: the id it stopped on
                    stop = getattr(comp, "stop_reason", None)
                    ids.append(stop if stop in eos_ids else eos_ids[0])
                responses.append(Response(ids, finished))
            result.append(responses)
        return result
