"""PPO / vBoN / BOND-backward hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline_lib.math.logprobs import truncates
from pipeline_lib.math.ppo_math import LR_SCHEDULES

RewardFn = Callable[[np.ndarray, list[str], list[list[int]]], np.ndarray]


MAX_GRAD_NORM = 1.0


@dataclass
class PPOConfig:
    """PPO / vBoN / BOND-backward hyper-parameters (see the module docstring)."""

    steps: int  # number of rollout batches (PPO iterations), total including resumed ones
    rollout_batch_size: int  # prompts per rollout (one sample each)
    minibatch_size: int
    ppo_epochs: int = 4
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | linear | cosine, over the PPO iterations
    lr_final: float = 0.0  # a decaying schedule's final lr as a fraction of lr
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
    top_k: int = 0  # 0 = no top-k truncation; truncation (top_p < 1, top_k > 0) is refused
    max_new_tokens: int = 32
    trainable_top_layers: int | None = None  # None = train all parameters
    sft_weight: float = 0.0  # BOND: weight of the forward-KL SFT term (NLL per token)
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
        need(self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(0.0 <= self.lr_final <= 1.0, f"lr_final must lie in [0, 1], got {self.lr_final!r}")
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
        need(not truncates(self.top_p, int(self.top_k)),
             f"top_p = {self.top_p} / top_k = {self.top_k} truncate the sampling distribution: "
             "a token the policy samples outside pi_ref's truncated support has pi_ref = 0, so "
             "the KL penalty is infinite; KL-regularised training needs top_p = 1 and "
             "top_k = 0 (any temperature is fine)")
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
