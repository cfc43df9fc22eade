"""Generation backends: sample M responses per prompt and score reference log-probs.

A backend turns prompt token ids into response token ids; :func:`sequence_logprobs` then
computes each response's log-probability under the reference policy at temperature 1 (a
plain forward pass, independent of the sampling temperature / top-p used to draw it).

Seeds are per *prompt group* (a fixed chunk of the split's prompts), so a prompt's samples
do not depend on how many shards the split is cut into or which machine runs the shard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_lib.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32


@dataclass
class Response:
    token_ids: list[int]  # generated ids, including the final EOS when finished
    finished: bool


def prompt_groups(n_prompts: int, m: int, batch_size: int) -> list[range]:
    """Fixed chunks of prompt indices such that each chunk has ~batch_size sequences."""
    per_group = max(1, batch_size // max(m, 1))
    return [range(s, min(s + per_group, n_prompts)) for s in range(0, n_prompts, per_group)]


def shard_groups(groups: Sequence[range], n_shards: int, shard: int) -> list[range]:
    """Contiguous share of the groups for ``shard`` in 0..n_shards-1."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    bounds = np.linspace(0, len(groups), n_shards + 1).round().astype(int)
    return list(groups[bounds[shard] : bounds[shard + 1]])


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of shape (B, max len): right padding (positions 0..L-1, as in
    training and log-prob scoring) or left padding (for ``generate``)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        attn[i, span] = 1
    return ids, attn


def trim_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """Generated ids cut after the first EOS (kept); unfinished responses are kept whole.

    ``generate`` pads a sequence only after its EOS, so every id before it, PAD included,
    was sampled and stays: the log-probs are then those of what was drawn."""
    ids = list(ids)
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def _trim(ids: list[int], eos_id: int | None) -> Response:
    kept = trim_at_eos(ids, eos_id)
    return Response(kept, eos_id is not None and eos_id in kept)


class HFBackend:
    """Batched sampling with ``transformers`` ``generate`` (KV cache on), CPU or GPU."""

    name = "hf"

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @torch.no_grad()
    def sample(
        self, prompt_ids: Sequence[Sequence[int]], m: int, params: SamplingParams, seed: int
    ) -> list[list[Response]]:
        """``m`` samples for each prompt (one generate call for the whole group)."""
        tok = self.tokenizer
        pad_id = tok.pad_token_id
        input_ids, attention = pad_batch(prompt_ids, pad_id, left=True)
        width = input_ids.shape[1]
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=m,
            pad_token_id=pad_id,
            eos_token_id=tok.eos_token_id,
            use_cache=True,
        )
        gen = out[:, width:].cpu().tolist()
        responses = [_trim(g, tok.eos_token_id) for g in gen]
        return [responses[i * m : (i + 1) * m] for i in range(len(prompt_ids))]


@torch.no_grad()
def sequence_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    per_token: bool = False,
):
    """Σ_t log π(y_t | x, y_<t) over each response, at temperature 1 (float64 array).

    Sequences are right-padded so that positions are 0..L-1 as in training. With
    ``per_token=True`` returns a list of per-token log-prob arrays instead.
    """
    out = np.empty(len(prompt_ids), dtype=np.float64)
    tokens: list[np.ndarray] = []
    model.eval()
    for start in range(0, len(prompt_ids), batch_size):
        ps = prompt_ids[start : start + batch_size]
        rs = response_ids[start : start + batch_size]
        full = [list(p) + list(r) for p, r in zip(ps, rs, strict=True)]
        ids, attn = pad_batch(full, pad_id)
        resp_mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, (p, f) in enumerate(zip(ps, full, strict=True)):
            resp_mask[i, len(p) : len(f)] = True
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = resp_mask[:, 1:].to(tok_logp.device)
        out[start : start + len(full)] = (tok_logp * mask).sum(-1).double().cpu().numpy()
        if per_token:
            lp = tok_logp.double().cpu().numpy()
            for i, (p, f) in enumerate(zip(ps, full, strict=True)):
                tokens.append(lp[i, len(p) - 1 : len(f) - 1])
    return tokens if per_token else out


def sample_groups(
    backend,
    prompt_ids: Sequence[Sequence[int]],
    groups: Sequence[range],
    m: int,
    params: SamplingParams,
    seed: int,
    split: str,
) -> dict[int, list[Response]]:
    """Sample ``m`` responses for every prompt in ``groups``; prompt index → responses."""
    result: dict[int, list[Response]] = {}
    bar = tqdm(total=sum(len(g) for g in groups), desc=f"sample {split}", unit="prompt",
               mininterval=2.0)
    for g in groups:
        group_seed = derive_seed(seed, "sample", split, g.start)
        batch = backend.sample([prompt_ids[i] for i in g], m, params, group_seed)
        for i, responses in zip(g, batch, strict=True):
            result[i] = responses
        bar.update(len(g))
    bar.close()
    return result


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
        eos = self.tokenizer.eos_token_id
        sp = [
            vllm.SamplingParams(
                n=m, temperature=params.temperature, top_p=params.top_p,
                top_k=max(params.top_k, 0), max_tokens=params.max_new_tokens,
                seed=derive_seed(seed, "vllm", j), detokenize=False,
                stop_token_ids=[] if eos is None else [eos],
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
                if finished and eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)
                responses.append(Response(ids, finished))
            result.append(responses)
        return result
