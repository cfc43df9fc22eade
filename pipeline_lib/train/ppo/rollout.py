"""Rollouts: right-padded prompt + response batches, sampling one response per prompt, and the
log-probs, values and entropy of a rollout under the policy and the frozen reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline_lib.generation.sampling import pad_batch, trim_at_eos
from pipeline_lib.math.logprobs import sampling_logits, sampling_logprobs
from pipeline_lib.math.losses import token_mean_nll
from pipeline_lib.math.ppo_math import (
    entropy_from_logits,
)
from pipeline_lib.train.ppo.config import PPOConfig
from pipeline_lib.train.ppo.policy import PolicyWithValueHead


@dataclass
class RolloutBatch:
    """Right-padded prompt + response sequences and the response-token layout.

    ``input_ids``/``attention_mask``: (B, W); ``resp_ids``/``mask``: (B, T), right-padded
    response tokens; ``pos``: (B, T) index of the logits/hidden state predicting each response
    token (P + j - 1), 0 where masked; ``full_len``: (B,) unpadded prompt + response lengths.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    resp_ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    full_len: torch.Tensor

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def rows(self, idx: torch.Tensor | np.ndarray) -> RolloutBatch:
        """A sub-batch, trimmed to its own widest sequence and longest response."""
        device = self.input_ids.device
        if isinstance(idx, torch.Tensor):
            idx = idx.to(device=device, dtype=torch.long)
        else:
            idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=device)
        full_len = self.full_len[idx]
        mask = self.mask[idx]
        width = int(full_len.max())
        t_len = max(int(mask.sum(dim=1).max()), 1)
        return RolloutBatch(
            self.input_ids[idx, :width],
            self.attention_mask[idx, :width],
            self.resp_ids[idx, :t_len],
            mask[:, :t_len],
            self.pos[idx, :t_len],
            full_len,
        )


def make_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> RolloutBatch:
    """Right-padded prompt + response sequences and their response-token layout."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode_prompt adds BOS)")
    b = len(prompts)
    full = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(f) for f in full)
    t_len = max(len(r) for r in responses)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp_ids = torch.full((b, t_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t_len), dtype=torch.float32)
    pos = torch.zeros((b, t_len), dtype=torch.long)
    for i, (p, r, f) in enumerate(zip(prompts, responses, full, strict=True)):
        input_ids[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        attn[i, : len(f)] = 1
        resp_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1.0
        pos[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
    return RolloutBatch(input_ids, attn, resp_ids, mask, pos,
                  torch.tensor([len(f) for f in full], dtype=torch.long))


def at_response(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Gather ``x`` (B, W, ...) at positions ``pos`` (B, T) -> (B, T, ...)."""
    if x.dim() == 2:
        return x.gather(1, pos)
    index = pos.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, cfg: PPOConfig | None = None
                   ) -> torch.Tensor:
    """The log-prob of each token under the sampling distribution of ``cfg`` (temperature,
    top-p, top-k; ``None``: the model's own, log-softmax of ``logits``), the one definition of
    π and π_ref: :func:`pipeline_lib.math.logprobs.sampling_logprobs`."""
    if cfg is None:
        return sampling_logprobs(logits, tokens)
    return sampling_logprobs(logits, tokens, float(cfg.temperature), float(cfg.top_p),
                             int(cfg.top_k))


def generation_config(cfg: PPOConfig, tokenizer, pad_id: int, eos_ids: Sequence[int]):
    """The transformers GenerationConfig of a rollout (sampling with the config's parameters,
    stopping on any of ``eos_ids``)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
        top_k=int(cfg.top_k),
        max_new_tokens=int(cfg.max_new_tokens),
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids) or None,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )


@torch.no_grad()
def generate_responses(policy, prompt_ids: Sequence[Sequence[int]], gen_cfg, pad_id: int, eos_id, device,
              synced: bool = False):
    """Sample one response per prompt. ``synced``: keep stepping until every rank is done
    (needed under ZeRO-3, where each forward gathers weights from all ranks)."""
    input_ids, attention = pad_batch(prompt_ids, pad_id, left=True)
    width = input_ids.shape[1]
    out = policy.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        generation_config=gen_cfg,
        synced_gpus=synced,
    )
    return [trim_at_eos(g, eos_id) for g in out[:, width:].cpu().tolist()]


def sft_token_nll(model: PolicyWithValueHead, batch: RolloutBatch,
                  cfg: PPOConfig | None = None) -> torch.Tensor:
    """BOND's forward term on a minibatch of best-of-n examples: the negative log-likelihood
    per response token (a scalar, :func:`pipeline_lib.math.losses.token_mean_nll`, the token
    mean of the PPO surrogate), under the sampling distribution of ``cfg`` (``None``:
    temperature 1), like every other log-prob of the run."""
    logits, _ = model(batch.input_ids, batch.attention_mask)
    logp = token_logprobs(at_response(logits, batch.pos).float(), batch.resp_ids, cfg)
    return token_mean_nll(logp, batch.mask)


@torch.no_grad()
def sft_nll(policy, examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
            device=None, batch_size: int = 64) -> np.ndarray:
    """Summed NLL (temperature 1) of each (prompt ids, response ids) example under ``policy``.

    Sequences are right-padded (positions 0..L-1); ``device`` defaults to the policy's.
    Returns a float64 array; puts ``policy`` in eval mode.
    """
    if device is None:
        device = next(policy.parameters()).device
    policy.eval()
    out = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = make_batch([p for p, _ in chunk], [r for _, r in chunk], pad_id).to(device)
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = token_logprobs(at_response(logits, batch.pos).float(), batch.resp_ids)
        out.append((-(logp * batch.mask).sum(dim=1)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def score_rollout(model, ref, batch: RolloutBatch, cfg: PPOConfig, chunk: int, acc):
    """Old log-probs, values, reference log-probs (B, T) — policy and reference both under
    the sampling distribution of ``cfg`` — and the summed token entropy of the policy's
    sampling distribution."""
    logps, values, ref_logps = [], [], []
    ent_sum = 0.0
    n = batch.input_ids.shape[0]
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        width = int(batch.full_len[rows].max())
        ids, attn = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]
        pos, toks, mask = batch.pos[rows], batch.resp_ids[rows], batch.mask[rows]
        logits, vals = model(ids, attn)
        logits = at_response(logits, pos).float()
        logps.append(token_logprobs(logits, toks, cfg))
        values.append(at_response(vals, pos))
        warped = sampling_logits(logits, float(cfg.temperature))  # no truncation in PPO
        ent_sum += float(entropy_from_logits(warped, mask)) * float(mask.sum())
        with acc.autocast():
            ref_logits = ref(input_ids=ids, attention_mask=attn, use_cache=False).logits
        ref_logps.append(token_logprobs(at_response(ref_logits, pos).float(), toks, cfg))
    return torch.cat(logps), torch.cat(values), torch.cat(ref_logps), ent_sum
