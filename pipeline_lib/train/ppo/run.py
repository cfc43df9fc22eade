"""A PPO run's state: the prepared model, optimizer and frozen reference, the loop state, and
starting, resuming and checkpointing a run."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib.math.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
)
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.train.checkpoints import (
    load_optimizer,
    load_rng,
    load_weights_dir,
    save_checkpoint,
)
from pipeline_lib.train.distributed import (
    configure_deepspeed,
    full_state_dict,
    unsharded_model,
)
from pipeline_lib.train.ppo.checkpoint import (
    CHECKPOINT_MARKER,
    Cycler,
    find_ppo_checkpoint,
    write_checkpoint_files,
)
from pipeline_lib.train.ppo.config import MAX_GRAD_NORM, PPOConfig
from pipeline_lib.train.ppo.policy import PolicyWithValueHead, set_trainable_top_layers
from pipeline_lib.train.ppo.rollout import (
    generation_config,
)
from pipeline_lib.train.runtime import make_accelerator

log = logging.getLogger(__name__)


# Config fields that may change between a run and its resumption without a warning.
_RESUMABLE_FIELDS = {"steps", "checkpoint_every", "log_every", "device", "mixed_precision"}


@dataclass
class LoopState:
    """What the loop carries from step to step (and what a checkpoint restores)."""

    step: int
    kl_ctl: FixedKLController | AdaptiveKLController
    rng: np.random.Generator
    prompt_cycler: Cycler
    sft_cycler: Cycler
    rows: list[dict]
    elapsed_before: float
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


@dataclass
class PPORun:
    """One training run: the prepared model and optimizer, the frozen reference, the encoded
    prompts and BOND examples, the process layout and the loop state."""

    cfg: PPOConfig
    seed: int
    acc: Any
    model: Any
    ref: Any
    optimizer: Any
    params: list
    tokenizer: Any
    prompt_ids: list[list[int]]
    sft_examples: list | None
    gen_cfg: Any
    pad_id: int
    eos_id: list[int]
    ckpt_root: Path | None
    resumed_from: Path | None
    state: LoopState

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index


def start_run(policy, tokenizer, prompts, cfg: PPOConfig, seed: int, checkpoint_dir, sft_examples,
           pad_id: int, eos_id) -> PPORun:
    """Accelerator, frozen reference, value head, optimizer and loop state; resumes from
    ``checkpoint_dir/last`` when it holds a checkpoint."""
    acc = make_accelerator(cfg.device, cfg.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    for key in ("rollout_batch_size", "minibatch_size"):
        if int(getattr(cfg, key)) % world:
            raise ValueError(f"PPOConfig: {key} ({getattr(cfg, key)}) must be a multiple of the "
                             f"{world} training processes")
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume_from = find_ppo_checkpoint(ckpt_root) if ckpt_root is not None else None
    # Frozen reference: a copy of the policy as given (the SFT model), before any resumed weights.
    ref = copy.deepcopy(policy).to(acc.device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    saved = _read_resume_state(resume_from, policy, cfg, seed, world)
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
    state = _loop_state(cfg, seed, len(prompts), len(sft_examples) if sft_examples else 0, saved)
    if saved is None:  # each rank samples its own responses (rank 0 keeps the one-process seed)
        torch.manual_seed(derive_seed(seed, "ppo", "torch", *([rank] if rank else [])))
    else:
        log.info("resuming PPO from %s at step %d", resume_from, state.step)
    return PPORun(cfg=cfg, seed=seed, acc=acc, model=model, ref=ref, optimizer=optimizer,
                  params=params, tokenizer=tokenizer,
                  prompt_ids=[encode_prompt(tokenizer, t) for t in prompts],
                  sft_examples=sft_examples, gen_cfg=generation_config(cfg, tokenizer, pad_id, eos_id),
                  pad_id=pad_id, eos_id=eos_id, ckpt_root=ckpt_root, resumed_from=resume_from,
                  state=state)


def _read_resume_state(resume_from: Path | None, policy, cfg: PPOConfig, seed: int,
                       world: int) -> dict[str, Any] | None:
    """The saved trainer state (the policy's weights loaded from it), or None for a new run."""
    if resume_from is None:
        return None
    state = json.loads((resume_from / CHECKPOINT_MARKER).read_text())
    if int(state.get("processes", 1)) != world:
        raise ValueError(
            f"cannot resume {resume_from}: written by {state.get('processes', 1)} "
            f"process(es), this run has {world}; use a fresh checkpoint_dir")
    load_weights_dir(policy, resume_from / "policy")
    _warn_config_changes(state, cfg, seed)
    return state


def _loop_state(cfg: PPOConfig, seed: int, n_prompts: int, n_sft: int,
                saved: Mapping[str, Any] | None) -> LoopState:
    if cfg.adaptive_kl:
        kl_ctl: FixedKLController | AdaptiveKLController = AdaptiveKLController(
            cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl_coef)
    state = LoopState(step=0, kl_ctl=kl_ctl, rng=np.random.default_rng(seed),
                      prompt_cycler=Cycler(n_prompts), sft_cycler=Cycler(n_sft), rows=[],
                      elapsed_before=0.0)
    if saved is not None:
        state.step = int(saved["step"])
        kl_ctl.value = float(saved["kl_coef"])
        state.rng.bit_generator.state = saved["numpy_rng"]
        state.prompt_cycler = Cycler(n_prompts, saved["prompt_cycler"])
        state.sft_cycler = Cycler(n_sft, saved["sft_cycler"])
        state.rows = list(saved["rows"])
        state.elapsed_before = float(saved.get("elapsed_s", 0.0))
    return state


def save_ppo_checkpoint(run: PPORun) -> None:
    """``checkpoint_dir/last``: weights (gathered under ZeRO-3), optimizer, RNG and loop state."""
    if run.ckpt_root is None:
        return
    st = run.state
    weights = full_state_dict(run.acc, run.model)  # a collective under ZeRO-3
    meta = {
        "step": st.step, "kl_coef": st.kl_ctl.value, "numpy_rng": st.rng.bit_generator.state,
        "prompt_cycler": st.prompt_cycler.state(), "sft_cycler": st.sft_cycler.state(),
        "rows": st.rows, "config": dataclasses.asdict(run.cfg), "seed": int(run.seed),
        "processes": run.world, "elapsed_s": st.elapsed(),
    }
    unwrapped = run.acc.unwrap_model(run.model)
    save_checkpoint(run.acc, run.ckpt_root, run.optimizer,
                    lambda tmp: write_checkpoint_files(tmp, unwrapped, weights, meta))


def final_policy(run: PPORun):
    """The trained policy as a plain HF causal LM in eval mode (None on the non-main ranks of
    ZeRO-3)."""
    full = unsharded_model(run.acc, run.model,
                           lambda: PolicyWithValueHead(copy.deepcopy(run.ref).cpu()))
    if full is None:  # a non-main rank under ZeRO-3
        return None
    final = full.policy
    for p in final.parameters():
        p.requires_grad_(True)
    return final.eval()


def _warn_config_changes(state: Mapping[str, Any], cfg: PPOConfig, seed: int) -> None:
    saved = state.get("config", {})
    now = dataclasses.asdict(cfg)
    changed = sorted(k for k in now if k not in _RESUMABLE_FIELDS and saved.get(k) != now[k])
    if changed:
        log.warning("resuming a PPO checkpoint with changed config fields %s", changed)
    if int(state.get("seed", seed)) != int(seed):
        log.warning("resuming a PPO checkpoint written with seed %s using seed %s",
                    state.get("seed"), seed)
