"""One PPO trainer for KL-constrained RLHF (``ppo``), vBoN (``vbon``) and BOND's backward half.

The three methods differ only in the sequence reward and, for BOND, an extra forward-KL term:

* ``ppo``:  R(y) = r(y) (the proxy reward), KL coefficient beta from config (fixed or adaptive);
* ``vbon``: R(y) = log F̂(r(y)) (``l1`` bound) or the exact bound, beta = 1/(n - 1)
  (METHODS.md, "vBoN objective"); the caller's ``reward_fn`` does the CDF lookup;
* ``bond``: the backward-KL (PPO) loss mixed with a forward-KL SFT term on best-of-n responses,
  see ``sft_weight`` below.

Per step (one PPO iteration, METHODS.md "KL-constrained RLHF"):

1. **Rollout.** ``rollout_batch_size`` prompt indices are taken from a seeded, shuffled order that
   is cycled through (re-shuffled after each pass). Prompts are ``encode_prompt`` ids (BOS + text),
   left-padded for ``generate`` (sampling with ``temperature``/``top_p``, ``top_k = 0``, i.e. no
   top-k truncation). Each response is cut after its first EOS (the EOS is kept); an unfinished
   response keeps all ``max_new_tokens`` tokens.
2. **Scoring.** Responses are decoded (``skip_special_tokens=True``) and passed to
   ``reward_fn(prompt_indices, response_texts, response_ids) -> float64 array (B,)``.
3. **Log-probs and values.** One forward pass over right-padded prompt + response (positions
   0..L-1, as in training) under the policy (old log-probs and values) and under the frozen
   reference (a deep copy of the policy taken before training). Token y_j of a response that
   starts at position P is scored by the logits at position P + j - 1; the value V_j is the value
   head applied to the last hidden state at the same position (the state *before* emitting y_j).
   Log-probs use ``logits / temperature`` for both policy and reference, the TRL convention, so
   that the ratio and the KL refer to the distribution that was actually sampled; with the
   default ``temperature = 1`` these are the plain model log-probs. ``top_p < 1`` is *not*
   reflected in the log-probs (as in TRL).
4. **Rewards and advantages.** :func:`~pipeline_lib.objectives.token_rewards` (per-token KL
   penalty -beta (log pi - log pi_ref), sequence reward at the last response token, optional
   clipping), :func:`~pipeline_lib.objectives.gae_advantages` (gamma, lambda) and, optionally,
   :func:`~pipeline_lib.objectives.whiten` of the advantages over the rollout.
5. **Optimisation.** ``ppo_epochs`` passes over shuffled minibatches of the rollout; each update
   minimises ``ppo_policy_loss + vf_coef * ppo_value_loss`` (both clipped), with gradient norm
   clipping at 1.0 and AdamW (constant ``lr``).
6. The KL controller (fixed, or adaptive with ``kl_target``/``kl_horizon``) is updated with the
   rollout's mean per-sequence k1 KL.

**BOND mix (``sft_weight = w > 0`` with ``sft_examples``).** Each update also draws a minibatch
of (prompt ids, response ids) best-of-n examples and computes the *summed* (over response tokens,
at temperature 1) negative log-likelihood, averaged over the minibatch. The loss becomes

    L = (1 - w) * L_PPO + w * NLL_mean      (= losses.bond_loss(NLL, L_PPO, 1 - w)),

the Jeffreys-divergence mix of BOND: the NLL is the forward-KL (mode-covering) term and the PPO
loss the backward-KL (mode-seeking) term. Note ``w`` weights the *forward* term here, i.e.
``w = 1 - beta_BOND`` in the paper's J_beta = (1 - beta) KL_fwd + beta KL_bwd.

**Model state.** Dropout is disabled throughout (the policy is kept in ``eval()`` mode while it
is trained), so that the PPO ratio is exactly 1 on the first update of each rollout. The value
head is a zero-initialised ``nn.Linear(hidden_size, 1)`` on the policy's last hidden state
(``output_hidden_states=True``), held with the policy in :class:`PolicyWithValueHead`; it shares
the policy trunk (value gradients reach the trainable blocks). ``trainable_top_layers = k`` trains
only the top k transformer blocks, the final norm, the LM head when it is not tied to the input
embeddings, and the value head. The returned policy is the plain HF causal LM.

**Checkpoints** (``checkpoint_dir/last/``, written to a temporary directory and moved into place
with ``os.replace``; the previous ``last`` is kept as ``last.old`` until the new one is in place):
``policy/`` (``save_pretrained``, safetensors), ``value_head.safetensors``, ``optimizer.pt``,
``rng.pt`` (torch CPU/CUDA RNG states), and ``trainer_state.json`` (step, KL coefficient, numpy
generator state, prompt/SFT cycling positions, config, seed and the log rows so far). Both
``.pt`` files are read back with ``torch.load(..., weights_only=True)``. A run started on a
directory that holds a checkpoint continues from its step (``cfg.steps`` is the *total* number of
steps), so a killed job resumes; on CPU the resumed run reproduces the uninterrupted one exactly.

**Log rows** (one per ``log_every`` steps, and the last): ``step``, ``loss`` (total, mean over
the step's updates), ``policy_loss``, ``value_loss``, ``reward`` and ``score`` (both the mean of
the ``reward_fn`` output, before ``reward_clip``), ``kl_k1`` (mean over the rollout of the
per-sequence sum_t (log pi - log pi_ref)), ``kl_k3`` (mean per-token k3), ``entropy`` (mean
per-token entropy of the sampling policy), ``kl_coef`` (the beta used for this rollout),
``lr``, ``clipfrac``, ``value_clipfrac``, ``approx_kl``, ``grad_norm`` (before clipping),
``sft_nll`` (mean summed NLL of the SFT minibatches; None without the BOND term),
``response_length`` (mean tokens, EOS included), ``prompts_seen`` and ``elapsed_s``. KL and
entropy use the tempered log-probs (identical to the model's at ``temperature = 1``).

Nothing assumes a GPU: ``accelerate`` places the model and applies mixed precision;
``accelerate``'s state is process-global, so one process cannot switch ``mixed_precision``
between calls (as for the other training loops).

**Several processes** (``accelerate launch``, DDP or DeepSpeed ZeRO-2/3): ``rollout_batch_size``
and ``minibatch_size`` are *global* sizes and must be multiples of the number of processes W.
Every rank draws the same prompt indices and minibatch orders (the numpy generator is seeded
alike), generates and scores its contiguous share B/W of the rollout (its own torch seed), and
optimises on minibatches of mb/W of its own rows; gradients are averaged over ranks. Advantages
are whitened with the mean and variance over all ranks' tokens; the KL controller and every
logged statistic use values reduced over ranks, so the log has one row per step, written by the
main process, which also writes the checkpoints (under ZeRO-3 the weights are gathered first;
each rank keeps its optimizer shard, see :mod:`pipeline_lib.checkpoints`). The frozen reference
is a full copy on every rank. With W = 1 everything is as described above.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline_lib.checkpoints import (
    clear_stale,
    find_checkpoint,
    load_optimizer,
    load_rng,
    load_weights_dir,
    save_checkpoint,
)
from pipeline_lib.distributed import (
    configure_deepspeed,
    full_state_dict,
    is_zero3,
    rank_slice,
    reduce_sums,
    unsharded_model,
    whiten_moments,
)
from pipeline_lib.generation import pad_batch, trim_at_eos
from pipeline_lib.losses import bond_loss
from pipeline_lib.modeling import encode_prompt
from pipeline_lib.objectives import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    kl_k1,
    kl_k3,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
)
from pipeline_lib.seeding import derive_seed
from pipeline_lib.training import _accelerator

__all__ = [
    "PPOConfig",
    "PolicyWithValueHead",
    "RewardFn",
    "load_checkpoint_policy",
    "set_trainable_top_layers",
    "sft_nll",
    "train_ppo",
]

log = logging.getLogger(__name__)

RewardFn = Callable[[np.ndarray, list[str], list[list[int]]], np.ndarray]

MAX_GRAD_NORM = 1.0
_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm", "norm_f", "ln_final")
# Config fields that may change between a run and its resumption without a warning.
_RESUMABLE_FIELDS = {"steps", "checkpoint_every", "log_every", "device", "mixed_precision"}


# ============================================================================================
# configuration
# ============================================================================================


@dataclass
class PPOConfig:
    """PPO / vBoN / BOND-backward hyper-parameters (see the module docstring)."""

    steps: int  # number of rollout batches (PPO iterations), total including resumed ones
    rollout_batch_size: int  # prompts per rollout (one sample each)
    minibatch_size: int
    ppo_epochs: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW
    kl_coef: float = 0.05  # beta (initial value when adaptive)
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    reward_clip: float | None = None
    whiten_advantages: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation (the log-probs assume none)
    max_new_tokens: int = 32
    trainable_top_layers: int | None = None  # None = train all parameters
    sft_weight: float = 0.0  # BOND: weight w of the forward-KL SFT term
    checkpoint_every: int = 10  # 0 = only at the end
    log_every: int = 1
    mixed_precision: str = "no"
    device: str = "auto"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"PPOConfig: {msg}")

        need(int(self.steps) >= 0, f"steps must be >= 0, got {self.steps!r}")
        need(int(self.rollout_batch_size) >= 1, "rollout_batch_size must be >= 1")
        need(
            1 <= int(self.minibatch_size) <= int(self.rollout_batch_size),
            f"minibatch_size must lie in [1, rollout_batch_size={self.rollout_batch_size}], "
            f"got {self.minibatch_size!r}",
        )
        need(int(self.ppo_epochs) >= 1, "ppo_epochs must be >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr!r}")
        need(self.weight_decay >= 0, "weight_decay must be >= 0")
        need(self.kl_coef >= 0 and math.isfinite(self.kl_coef), "kl_coef must be >= 0")
        if self.adaptive_kl:
            need(self.kl_coef > 0, "adaptive_kl needs kl_coef > 0")
            need(self.kl_target > 0 and self.kl_horizon > 0, "kl_target/kl_horizon must be > 0")
        need(self.clip > 0 and self.value_clip > 0, "clip and value_clip must be > 0")
        need(self.vf_coef >= 0, "vf_coef must be >= 0")
        need(0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0, "gamma, lam must lie in [0, 1]")
        need(self.reward_clip is None or self.reward_clip > 0, "reward_clip must be > 0 or None")
        need(self.temperature > 0, "temperature must be > 0")
        need(0.0 < self.top_p <= 1.0, "top_p must lie in (0, 1]")
        need(int(self.top_k) >= 0, "top_k must be >= 0")
        need(int(self.max_new_tokens) >= 1, "max_new_tokens must be >= 1")
        need(
            self.trainable_top_layers is None or int(self.trainable_top_layers) >= 0,
            "trainable_top_layers must be None or >= 0",
        )
        need(0.0 <= self.sft_weight <= 1.0, "sft_weight must lie in [0, 1]")
        need(int(self.checkpoint_every) >= 0, "checkpoint_every must be >= 0")
        need(int(self.log_every) >= 1, "log_every must be >= 1")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PPOConfig:
        """Build from a config mapping; unknown keys are an error (typos should not pass)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"PPOConfig: unknown keys {unknown}")
        return cls(**dict(cfg))


# ============================================================================================
# policy + value head
# ============================================================================================


def _hidden_size(policy) -> int:
    config = policy.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


class PolicyWithValueHead(nn.Module):
    """A causal LM with a scalar value head on its last hidden state.

    ``forward`` returns ``(logits, values)`` of shapes (B, L, V) and (B, L) (float32 values).
    """

    def __init__(self, policy: nn.Module, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.policy = policy
        if value_head is None:
            value_head = nn.Linear(_hidden_size(policy), 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values.float()


def _transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the ``nn.ModuleList`` of num_hidden_layers."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and (n_layers is None or len(m) == n_layers)
    ]
    if not candidates:
        raise ValueError(f"could not find the transformer blocks of {type(model).__name__}")
    candidates.sort(key=lambda item: (item[0].count("."), -len(item[1])))
    return candidates[0][1]


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _lm_head_is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return False
    return out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()


def set_trainable_top_layers(model: nn.Module, k: int | None) -> list[str]:
    """Freeze all but the top ``k`` transformer blocks, the final norm and an untied LM head.

    ``k = None`` makes every parameter trainable. Returns the names of trainable parameters.
    """
    if k is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    blocks = _transformer_blocks(model)
    if k > len(blocks):
        raise ValueError(f"trainable_top_layers={k} but the model has {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    train_modules: list[nn.Module] = list(blocks[len(blocks) - k :]) if k > 0 else []
    norm = _final_norm(model)
    if norm is None:
        log.warning("no final norm found on %s; only the top blocks are trained",
                    type(model).__name__)
    else:
        train_modules.append(norm)
    if not _lm_head_is_tied(model) and model.get_output_embeddings() is not None:
        train_modules.append(model.get_output_embeddings())
    for module in train_modules:
        for p in module.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ============================================================================================
# batching
# ============================================================================================


@dataclass
class _Batch:
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

    def to(self, device) -> _Batch:
        return _Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def rows(self, idx: torch.Tensor | np.ndarray) -> _Batch:
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
        return _Batch(
            self.input_ids[idx, :width],
            self.attention_mask[idx, :width],
            self.resp_ids[idx, :t_len],
            mask[:, :t_len],
            self.pos[idx, :t_len],
            full_len,
        )


def _make_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> _Batch:
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
    return _Batch(input_ids, attn, resp_ids, mask, pos,
                  torch.tensor([len(f) for f in full], dtype=torch.long))


def _at_response(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Gather ``x`` (B, W, ...) at positions ``pos`` (B, T) -> (B, T, ...)."""
    if x.dim() == 2:
        return x.gather(1, pos)
    index = pos.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _Cycler:
    """Indices drawn from a shuffled order of ``n`` items, re-shuffled after each pass."""

    def __init__(self, n: int, state: Mapping[str, Any] | None = None) -> None:
        self.n = n
        if state and (len(state["order"]) not in (0, n)):
            raise ValueError(
                f"checkpoint cycles through {len(state['order'])} items but {n} were given; "
                "resume with the same prompts / sft_examples"
            )
        self.order: list[int] = list(state["order"]) if state else []
        self.pos: int = int(state["pos"]) if state else 0
        self.passes: int = int(state.get("passes", 0)) if state else 0

    def take(self, k: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = [int(i) for i in rng.permutation(self.n)]
                self.pos = 0
                self.passes += 1
            take = min(k - len(out), len(self.order) - self.pos)
            out.extend(self.order[self.pos : self.pos + take])
            self.pos += take
        return np.asarray(out, dtype=np.int64)

    def state(self) -> dict[str, Any]:
        return {"order": self.order, "pos": self.pos, "passes": self.passes}


# ============================================================================================
# checkpoints
# ============================================================================================


_MARKER = "trainer_state.json"


def _find_checkpoint(checkpoint_dir: Path) -> Path | None:
    """``last`` (or ``last.old`` when a save died between its two renames); clears tmp dirs."""
    clear_stale(checkpoint_dir)
    return find_checkpoint(checkpoint_dir, _MARKER)


def _write_checkpoint_files(tmp: Path, model: PolicyWithValueHead, weights: Mapping[str, Any],
                            trainer_state: Mapping[str, Any]) -> None:
    """The PPO trainer's part of a checkpoint (see :func:`pipeline_lib.checkpoints.save_checkpoint`):
    ``policy/`` (save_pretrained), ``value_head.safetensors`` and, last, the marker JSON."""
    from safetensors.torch import save_file

    policy_sd = {k[len("policy."):]: v for k, v in weights.items() if k.startswith("policy.")}
    head_sd = {k[len("value_head."):]: v for k, v in weights.items()
               if k.startswith("value_head.")}
    model.policy.save_pretrained(tmp / "policy", state_dict=policy_sd, safe_serialization=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head_sd.items()},
              str(tmp / "value_head.safetensors"))
    (tmp / _MARKER).write_text(json.dumps(trainer_state))


def load_checkpoint_policy(checkpoint_dir: str | Path, device: str = "cpu"):
    """The policy saved in ``checkpoint_dir/last`` as a plain HF causal LM (eval mode)."""
    from pipeline_lib.modeling import load_causal_lm

    path = _find_checkpoint(Path(checkpoint_dir))
    if path is None:
        raise FileNotFoundError(f"no PPO checkpoint under {checkpoint_dir}")
    return load_causal_lm(path / "policy", device=device, key="ppo checkpoint")


# ============================================================================================
# the trainer
# ============================================================================================


def _generation_config(cfg: PPOConfig, tokenizer, pad_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
        top_k=int(cfg.top_k),
        max_new_tokens=int(cfg.max_new_tokens),
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )


@torch.no_grad()
def _generate(policy, prompt_ids: Sequence[Sequence[int]], gen_cfg, pad_id: int, eos_id, device,
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


def _sequence_nll(model: PolicyWithValueHead, batch: _Batch) -> torch.Tensor:
    """Summed (over response tokens) negative log-likelihood at temperature 1, shape (B,)."""
    logits, _ = model(batch.input_ids, batch.attention_mask)
    logp = _token_logprobs(_at_response(logits, batch.pos).float(), batch.resp_ids)
    return -(logp * batch.mask).sum(dim=1)


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
        batch = _make_batch([p for p, _ in chunk], [r for _, r in chunk], pad_id).to(device)
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = _token_logprobs(_at_response(logits, batch.pos).float(), batch.resp_ids)
        out.append((-(logp * batch.mask).sum(dim=1)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def _score_rollout(model, ref, batch: _Batch, temperature: float, chunk: int, acc):
    """Old log-probs, values, reference log-probs (B, T) and the summed token entropy."""
    logps, values, ref_logps = [], [], []
    ent_sum = 0.0
    n = batch.input_ids.shape[0]
    for s in range(0, n, chunk):
        rows = slice(s, min(s + chunk, n))
        width = int(batch.full_len[rows].max())
        ids, attn = batch.input_ids[rows, :width], batch.attention_mask[rows, :width]
        pos, toks, mask = batch.pos[rows], batch.resp_ids[rows], batch.mask[rows]
        logits, vals = model(ids, attn)
        logits = _at_response(logits, pos).float() / temperature
        logps.append(_token_logprobs(logits, toks))
        values.append(_at_response(vals, pos))
        ent_sum += float(entropy_from_logits(logits, mask)) * float(mask.sum())
        with acc.autocast():
            ref_logits = ref(input_ids=ids, attention_mask=attn, use_cache=False).logits
        ref_logps.append(_token_logprobs(_at_response(ref_logits, pos).float() / temperature, toks))
    return torch.cat(logps), torch.cat(values), torch.cat(ref_logps), ent_sum


def train_ppo(
    policy,
    tokenizer,
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    sft_examples: list[tuple[list[int], list[int]]] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[list[dict], Any]:
    """Train ``policy`` with PPO against ``reward_fn`` and a frozen copy of itself.

    Args:
        policy: HF causal LM (e.g. loaded from the SFT directory); trained in place.
        tokenizer: its tokenizer (pad token falls back to EOS).
        prompts: prompt texts, encoded with :func:`~pipeline_lib.modeling.encode_prompt`.
        reward_fn: ``(prompt_indices (B,), response_texts, response_ids) -> (B,) float64``
            sequence rewards (the proxy reward for ``ppo``, log F̂ for ``vbon``).
        cfg: hyper-parameters; ``cfg.steps`` counts all steps including resumed ones.
        seed: seeds prompt order, minibatch order and sampling.
        checkpoint_dir: where ``last/`` is saved and, when present, resumed from.
        sft_examples: BOND forward-KL examples (prompt ids, response ids); used when
            ``cfg.sft_weight > 0``.
        on_log: called with each *new* log row (not with rows restored from a checkpoint).

    Returns:
        (log rows, the trained policy as a plain HF causal LM in eval mode).
    """
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt")
    use_sft = cfg.sft_weight > 0
    if use_sft and not sft_examples:
        raise ValueError("sft_weight > 0 needs sft_examples")
    if sft_examples and not use_sft:
        log.info("sft_examples given but sft_weight = 0: the SFT term is not used")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer needs a pad or eos token")

    acc = _accelerator({"device": cfg.device, "mixed_precision": cfg.mixed_precision})
    world, rank = acc.num_processes, acc.process_index
    for key in ("rollout_batch_size", "minibatch_size"):
        if int(getattr(cfg, key)) % world:
            raise ValueError(f"PPOConfig: {key} ({getattr(cfg, key)}) must be a multiple of the "
                             f"{world} training processes")
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume_from = _find_checkpoint(ckpt_root) if ckpt_root is not None else None

    # Frozen reference: a copy of the policy as given (the SFT model), before any resumed weights.
    ref = copy.deepcopy(policy).to(acc.device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)

    state: dict[str, Any] | None = None
    if resume_from is not None:
        state = json.loads((resume_from / _MARKER).read_text())
        if int(state.get("processes", 1)) != world:
            raise ValueError(
                f"cannot resume {resume_from}: written by {state.get('processes', 1)} "
                f"process(es), this run has {world}; use a fresh checkpoint_dir")
        load_weights_dir(policy, resume_from / "policy")
        _warn_config_changes(state, cfg, seed)

    model = PolicyWithValueHead(policy)
    if resume_from is not None:
        from safetensors.torch import load_file

        model.value_head.load_state_dict(load_file(str(resume_from / "value_head.safetensors")))
    set_trainable_top_layers(policy, cfg.trainable_top_layers)
    for p in model.value_head.parameters():
        p.requires_grad_(True)
    model.eval()  # no dropout: the PPO ratio must be 1 at the first update (see module doc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    configure_deepspeed(acc, int(cfg.minibatch_size) // world, MAX_GRAD_NORM)
    model, optimizer = acc.prepare(model, optimizer)
    model.eval()
    if resume_from is not None:
        load_optimizer(acc, optimizer, resume_from)
        load_rng(acc, resume_from)

    if cfg.adaptive_kl:
        kl_ctl: FixedKLController | AdaptiveKLController = AdaptiveKLController(
            cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl_coef)

    rng = np.random.default_rng(seed)
    prompt_cycler = _Cycler(len(prompts))
    sft_cycler = _Cycler(len(sft_examples) if sft_examples else 0)
    rows: list[dict] = []
    step = 0
    if state is not None:
        step = int(state["step"])
        kl_ctl.value = float(state["kl_coef"])
        rng.bit_generator.state = state["numpy_rng"]
        prompt_cycler = _Cycler(len(prompts), state["prompt_cycler"])
        sft_cycler = _Cycler(len(sft_examples) if sft_examples else 0, state["sft_cycler"])
        rows = list(state["rows"])
        log.info("resuming PPO from %s at step %d", resume_from, step)
    else:
        # each rank samples its own responses (rank 0 keeps the one-process seed)
        torch.manual_seed(derive_seed(seed, "ppo", "torch", *([rank] if rank else [])))

    prompt_ids = [encode_prompt(tokenizer, t) for t in prompts]
    gen_cfg = _generation_config(cfg, tokenizer, pad_id)
    unwrapped = acc.unwrap_model(model)
    total = int(cfg.steps)
    elapsed_before = float(state.get("elapsed_s", 0.0)) if state else 0.0
    t0 = time.perf_counter()

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "kl_coef": kl_ctl.value,
            "numpy_rng": rng.bit_generator.state,
            "prompt_cycler": prompt_cycler.state(),
            "sft_cycler": sft_cycler.state(),
            "rows": rows,
            "config": dataclasses.asdict(cfg),
            "seed": int(seed),
            "processes": world,
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
        }

    def checkpoint() -> None:
        if ckpt_root is None:
            return
        weights = full_state_dict(acc, model)  # a collective under ZeRO-3
        meta = trainer_state()
        save_checkpoint(acc, ckpt_root, optimizer,
                        lambda tmp: _write_checkpoint_files(tmp, unwrapped, weights, meta))

    bar = tqdm(total=total, initial=min(step, total), desc="ppo", unit="step", mininterval=5.0,
               disable=not acc.is_main_process)
    saved_at = step
    mb, b_size = int(cfg.minibatch_size), int(cfg.rollout_batch_size)
    mb_local, b_local = mb // world, b_size // world
    mine = rank_slice(b_size, rank, world)
    synced = is_zero3(acc)
    while step < total:
        # ---------------------------------------------------------------- rollout
        idx = prompt_cycler.take(b_size, rng)[mine]  # every rank draws alike, keeps its share
        batch_prompts = [prompt_ids[i] for i in idx]
        responses = _generate(unwrapped.policy, batch_prompts, gen_cfg, pad_id, eos_id,
                              acc.device, synced=synced)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = np.asarray(reward_fn(idx.copy(), list(texts), [list(r) for r in responses]),
                            dtype=np.float64)
        if scores.shape != (b_local,) or not np.all(np.isfinite(scores)):
            raise ValueError(
                f"reward_fn must return {b_local} finite rewards, got shape {scores.shape}"
                + ("" if scores.shape != (b_local,) else " with non-finite values"))
        batch = _make_batch(batch_prompts, responses, pad_id).to(acc.device)
        mask = batch.mask
        old_logp, old_values, ref_logp, ent_sum = _score_rollout(
            model, ref, batch, float(cfg.temperature), mb_local, acc)
        beta = kl_ctl.value
        seq_reward = torch.as_tensor(scores, dtype=torch.float32, device=acc.device)
        rewards = token_rewards(seq_reward, old_logp, ref_logp, mask, beta, cfg.reward_clip)
        adv, returns = gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            if world == 1:
                if float(mask.sum()) > 1:
                    adv = whiten(adv, mask)
            else:
                am = adv * mask
                s_x, s_x2, n_tok = reduce_sums(acc, [am.sum(), (am * adv).sum(), mask.sum()])
                if n_tok > 1:
                    adv = whiten(adv, mask, moments=whiten_moments(s_x, s_x2, n_tok))

        # ---------------------------------------------------------------- optimisation
        stats: dict[str, list[float]] = {k: [] for k in (
            "loss", "policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl",
            "grad_norm", "sft_nll")}
        for _ in range(int(cfg.ppo_epochs)):
            perm = rng.permutation(b_local)
            for s in range(0, b_local, mb_local):
                rows_idx = torch.as_tensor(perm[s : s + mb_local], dtype=torch.long,
                                           device=acc.device)
                sub = batch.rows(rows_idx)
                t_len = sub.mask.shape[1]
                logits, values = model(sub.input_ids, sub.attention_mask)
                logits = _at_response(logits, sub.pos).float() / float(cfg.temperature)
                logp = _token_logprobs(logits, sub.resp_ids)
                values = _at_response(values, sub.pos)
                pl, clipfrac, approx_kl = ppo_policy_loss(
                    logp, old_logp[rows_idx, :t_len], adv[rows_idx, :t_len], sub.mask, cfg.clip)
                vl, vclipfrac = ppo_value_loss(
                    values, old_values[rows_idx, :t_len], returns[rows_idx, :t_len], sub.mask,
                    cfg.value_clip)
                loss = pl + cfg.vf_coef * vl
                if use_sft:
                    take = sft_cycler.take(mb, rng)[rank_slice(mb, rank, world)]
                    ex = [sft_examples[i] for i in take]
                    sft_batch = _make_batch([p for p, _ in ex], [r for _, r in ex], pad_id)
                    nll = _sequence_nll(model, sft_batch.to(acc.device)).mean()
                    loss = bond_loss(nll, loss, 1.0 - cfg.sft_weight)
                    stats["sft_nll"].append(float(nll.detach()))
                acc.backward(loss)
                grad_norm = acc.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(float(loss.detach()))
                stats["policy_loss"].append(float(pl.detach()))
                stats["value_loss"].append(float(vl.detach()))
                stats["clipfrac"].append(float(clipfrac))
                stats["value_clipfrac"].append(float(vclipfrac))
                stats["approx_kl"].append(float(approx_kl))
                stats["grad_norm"].append(float(grad_norm) if grad_norm is not None else 0.0)

        # ---------------------------------------------------------------- bookkeeping
        with torch.no_grad():
            kl_tok = kl_k1(old_logp, ref_logp) * mask
            k3_tok = torch.where(mask.bool(), kl_k3(old_logp, ref_logp), torch.zeros_like(mask))
            local = [kl_tok.sum(), k3_tok.sum(), mask.sum(), ent_sum, float(scores.sum())]
            if world == 1:
                kl_seq = float(kl_tok.sum(dim=1).mean())
                kl3 = float(masked_mean(kl_k3(old_logp, ref_logp), mask))
                n_tok, ent_total, score_mean = float(mask.sum()), ent_sum, float(scores.mean())
            else:
                kl_total, k3_total, n_tok, ent_total, score_total = reduce_sums(acc, local)
                kl_seq, kl3 = kl_total / b_size, k3_total / n_tok
                score_mean = score_total / b_size
        kl_ctl.update(kl_seq, b_size)
        step += 1
        bar.update(1)
        if step % int(cfg.log_every) == 0 or step == total:
            means = {k: float(np.mean(v)) for k, v in stats.items() if v}
            if world > 1:  # per-update statistics: the mean over ranks
                keys = sorted(means)
                means = dict(zip(keys, (v / world for v in reduce_sums(
                    acc, [means[k] for k in keys])), strict=True))
            row = dict(
                step=step,
                loss=means["loss"],
                policy_loss=means["policy_loss"],
                value_loss=means["value_loss"],
                reward=score_mean,
                score=score_mean,
                kl_k1=kl_seq,
                kl_k3=kl3,
                entropy=ent_total / n_tok,
                kl_coef=float(beta),
                lr=float(optimizer.param_groups[0]["lr"]),
                clipfrac=means["clipfrac"],
                value_clipfrac=means["value_clipfrac"],
                approx_kl=means["approx_kl"],
                grad_norm=means["grad_norm"],
                sft_nll=means.get("sft_nll"),
                response_length=n_tok / b_size,
                prompts_seen=step * b_size,
                elapsed_s=elapsed_before + time.perf_counter() - t0,
            )
            rows.append(row)
            if on_log is not None and acc.is_main_process:
                on_log(row)
        if cfg.checkpoint_every and step % int(cfg.checkpoint_every) == 0 and step < total:
            checkpoint()
            saved_at = step
    bar.close()
    if ckpt_root is not None and (saved_at != step or resume_from is None):
        checkpoint()
    full = unsharded_model(acc, model, lambda: PolicyWithValueHead(copy.deepcopy(ref).cpu()))
    if full is None:  # a non-main rank under ZeRO-3
        return rows, None
    final = full.policy
    for p in final.parameters():
        p.requires_grad_(True)
    return rows, final.eval()


def _warn_config_changes(state: Mapping[str, Any], cfg: PPOConfig, seed: int) -> None:
    saved = state.get("config", {})
    now = dataclasses.asdict(cfg)
    changed = sorted(k for k in now if k not in _RESUMABLE_FIELDS and saved.get(k) != now[k])
    if changed:
        log.warning("resuming a PPO checkpoint with changed config fields %s", changed)
    if int(state.get("seed", seed)) != int(seed):
        log.warning("resuming a PPO checkpoint written with seed %s using seed %s",
                    state.get("seed"), seed)
