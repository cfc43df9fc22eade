"""PPO checkpoints (``checkpoint_dir/last``): the policy, the value head and the trainer state."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.models.loading import load_causal_lm
from pipeline_lib.train.checkpoints import (
    clear_stale,
    find_checkpoint,
)
from pipeline_lib.train.ppo.policy import PolicyWithValueHead


class Cycler:
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


CHECKPOINT_MARKER = "trainer_state.json"


def find_ppo_checkpoint(checkpoint_dir: Path) -> Path | None:
    """``last`` (or ``last.old`` when a save died between its two renames); clears tmp dirs."""
    clear_stale(checkpoint_dir)
    return find_checkpoint(checkpoint_dir, CHECKPOINT_MARKER)


def write_checkpoint_files(tmp: Path, model: PolicyWithValueHead, weights: Mapping[str, Any],
                            trainer_state: Mapping[str, Any]) -> None:
    """The PPO trainer's part of a checkpoint (see :func:`pipeline_lib.train.checkpoints.save_checkpoint`):
    ``policy/`` (save_pretrained), ``value_head.safetensors`` and, last, the marker JSON."""
    from safetensors.torch import save_file

    policy_sd = {k[len("policy."):]: v for k, v in weights.items() if k.startswith("policy.")}
    head_sd = {k[len("value_head."):]: v for k, v in weights.items()
               if k.startswith("value_head.")}
    model.policy.save_pretrained(tmp / "policy", state_dict=policy_sd, safe_serialization=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head_sd.items()},
              str(tmp / "value_head.safetensors"))
    (tmp / CHECKPOINT_MARKER).write_text(json.dumps(trainer_state))


def load_checkpoint_policy(checkpoint_dir: str | Path, device: str = "cpu"):
    """The policy saved in ``checkpoint_dir/last`` as a plain HF causal LM (eval mode)."""

    path = find_ppo_checkpoint(Path(checkpoint_dir))
    if path is None:
        raise FileNotFoundError(f"no PPO checkpoint under {checkpoint_dir}")
    return load_causal_lm(path / "policy", device=device, key="ppo checkpoint")
