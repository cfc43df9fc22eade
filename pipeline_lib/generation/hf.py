"""The Hugging Face ``generate`` backend and the reference log-probs of sampled responses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline_lib.generation.sampling import Response, SamplingParams, pad_batch, response_from_ids
from pipeline_lib.math.logprobs import sampling_logprobs
from pipeline_lib.models.encoding import eos_token_ids


class HFBackend:
    """Batched sampling with ``transformers`` ``generate`` (KV cache on), CPU or GPU."""

    name = "hf"

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.eos_ids = eos_token_ids(tokenizer, model)

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
            eos_token_id=self.eos_ids,
            use_cache=True,
        )
        gen = out[:, width:].cpu().tolist()
        responses = [response_from_ids(g, self.eos_ids) for g in gen]
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
    params: SamplingParams | None = None,
    keep_tokens: bool = False,
):
    """Σ_t log π(y_t | x, y_<t) over each response under the *sampling distribution* of
    ``params`` (temperature, top-p, top-k; ``None``: the model's own distribution, T = 1):
    :func:`pipeline_lib.math.logprobs.sampling_logprobs` (float64 array).

    A token outside the truncated (top-p / top-k) support scores ``-inf``; ``keep_tokens=True``
    keeps the scored tokens in the support, for responses the model sampled itself with
    ``params`` (round-off at the truncation boundary then never gives ``-inf``).
    Sequences are right-padded so that positions are 0..L-1 as in training. With
    ``per_token=True`` returns a list of per-token log-prob arrays instead.
    """
    sp = SamplingParams() if params is None else params
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
        tok_logp = sampling_logprobs(logits[:, :-1], ids[:, 1:], sp.temperature, sp.top_p,
                                     sp.top_k, keep_tokens=keep_tokens)
        mask = resp_mask[:, 1:].to(tok_logp.device)
        # where, not a product: a prompt or padding position may score -inf under truncation
        tok_logp = torch.where(mask, tok_logp, torch.zeros_like(tok_logp))
        out[start : start + len(full)] = tok_logp.sum(-1).double().cpu().numpy()
        if per_token:
            lp = tok_logp.double().cpu().numpy()
            for i, (p, f) in enumerate(zip(ps, full, strict=True)):
                tokens.append(lp[i, len(p) - 1 : len(f) - 1])
    return tokens if per_token else out
