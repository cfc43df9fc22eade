"""SFT and reward-model training: a killed run resumes from its checkpoint to the weights and
log of an uninterrupted run (exactly, on CPU), and a checkpoint of other settings is refused.

The tiny policy keeps GPT-2's dropout (0.1), so an exact match also needs the torch RNG state
back; the kill lands after a checkpoint and a few more steps, so the resumed run must also
replay the data order (mid-epoch and at an epoch boundary).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline_lib.models.loading import load_causal_lm, load_tokenizer
from pipeline_lib.settings.sections import RewardModelSettings, SFTSettings
from pipeline_lib.train import reward_model as rm_training
from pipeline_lib.train.reward_model import train_reward_model
from pipeline_lib.train.sft import train_sft

WORDS = "good bad film plot cast dull warm slow funny long story acting".split()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(n)]


class _Killed(RuntimeError):
    pass


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(rows_a: list[dict], rows_b: list[dict]) -> None:
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_b]


# --------------------------------------------------------------------------------------------
# SFT: 23 texts in batches of 5 = 5 steps per epoch, 3 epochs = 15 steps
# --------------------------------------------------------------------------------------------
SFT_CFG = SFTSettings(enabled=True, epochs=3, max_steps=None, batch_size=5, lr=3e-3, weight_decay=0.0,
                      warmup_steps=2, max_length=16, log_every=1, eval_every=4,
                      checkpoint_every=0, mixed_precision="no")


def _sft(policy_dir, seed=5, **kwargs):
    tok = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir)
    torch.manual_seed(0)  # the job seeds torch (dropout) before training
    cfg = dataclasses.replace(SFT_CFG, **kwargs.pop("cfg", {}))
    return train_sft(model, tok, texts(23, 0), texts(6, 1), cfg, "cpu", seed=seed, **kwargs)


@pytest.fixture(scope="module")
def sft_uninterrupted(tiny_policy_dir):
    rows, model = _sft(tiny_policy_dir)
    return rows, _weights(model)


@pytest.mark.parametrize("every, kill_at, resume_at", [(3, 8, 7), (5, 8, 6)])
def test_killed_sft_resumes_to_the_uninterrupted_weights(tiny_policy_dir, tmp_path,
                                                         sft_uninterrupted, every, kill_at,
                                                         resume_at):
    """every=3: the checkpoint at step 6 is mid-epoch; every=5: at an epoch boundary."""
    rows_full, full = sft_uninterrupted

    def die(row: dict) -> None:
        if row["step"] == kill_at:
            raise _Killed

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        _sft(tiny_policy_dir, cfg={"checkpoint_every": every}, checkpoint_dir=ckpt, on_log=die)
    state = json.loads((ckpt / "last" / "state.json").read_text())
    assert state["step"] == resume_at - 1
    seen: list[int] = []
    rows, model = _sft(tiny_policy_dir, cfg={"checkpoint_every": every}, checkpoint_dir=ckpt,
                       on_log=lambda r: seen.append(r["step"]))
    assert seen[0] == resume_at and seen[-1] == 15  # on_log sees new rows only
    _same(rows, rows_full)
    got = _weights(model)
    assert all(torch.equal(got[k], full[k]) for k in full)


def test_sft_dropout_and_order_matter_so_the_resume_test_can_fail(tiny_policy_dir,
                                                                   sft_uninterrupted):
    _, full = sft_uninterrupted
    _, other_order = _sft(tiny_policy_dir, seed=6)
    assert not torch.equal(_weights(other_order)["transformer.wte.weight"],
                           full["transformer.wte.weight"])
    tok = load_tokenizer(tiny_policy_dir)
    model = load_causal_lm(tiny_policy_dir)
    torch.manual_seed(1)  # another dropout stream, same data order
    _, other_dropout = train_sft(model, tok, texts(23, 0), texts(6, 1), SFT_CFG, "cpu", seed=5)
    assert not torch.equal(_weights(other_dropout)["transformer.wte.weight"],
                           full["transformer.wte.weight"])


def test_sft_refuses_a_checkpoint_of_another_seed(tiny_policy_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        _sft(tiny_policy_dir, cfg={"checkpoint_every": 2}, checkpoint_dir=ckpt,
             on_log=lambda r: (_ for _ in ()).throw(_Killed) if r["step"] == 3 else None)
    with pytest.raises(ValueError, match=r"cannot resume from .*'seed': \(5, 9\)"):
        _sft(tiny_policy_dir, seed=9, cfg={"checkpoint_every": 2}, checkpoint_dir=ckpt)


# --------------------------------------------------------------------------------------------
# Reward model: 18 pairs, 4 held out, 14 in batches of 5 = 3 steps per epoch, 3 epochs
# --------------------------------------------------------------------------------------------
RM_CFG = RewardModelSettings(seeds=(1,), base="sft", revision=None, trust_remote_code=False,
                             input="concat", template=None, pretrained=(), epochs=3, batch_size=5, lr=3e-3, weight_decay=0.0,
                             warmup_steps=1, center_coef=0.01, val_fraction=0.2, max_length=16,
                             log_every=1, checkpoint_every=0, mixed_precision="no")


def _rm(policy_dir, **kwargs):
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(policy_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    cfg = dataclasses.replace(RM_CFG, **kwargs.pop("cfg", {}))
    return train_reward_model(model, tok, texts(18, 2), texts(18, 3), cfg, "cpu", seed=4,
                              **kwargs)


@pytest.mark.parametrize("every, kill_step", [(2, 5), (3, 5)])
def test_killed_reward_model_resumes_to_the_uninterrupted_weights(tiny_policy_dir, tmp_path,
                                                                  monkeypatch, every,
                                                                  kill_step):
    rows_full, full = _rm(tiny_policy_dir)
    ckpt = tmp_path / "ckpt"
    calls = {"n": 0}
    scores = rm_training._rm_scores

    def dying(*args, **kwargs):  # two calls per step: dies inside step kill_step
        calls["n"] += 1
        if calls["n"] == 2 * kill_step - 1:
            raise _Killed
        return scores(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(rm_training, "_rm_scores", dying)
        with pytest.raises(_Killed):
            _rm(tiny_policy_dir, cfg={"checkpoint_every": every}, checkpoint_dir=ckpt)
    saved = json.loads((ckpt / "last" / "state.json").read_text())["step"]
    assert saved == (kill_step - 1) // every * every
    saved_rows = json.loads((ckpt / "last" / "log_rows.json").read_text())
    rows, model = _rm(tiny_policy_dir, cfg={"checkpoint_every": every}, checkpoint_dir=ckpt)
    assert rows[: len(saved_rows)] == saved_rows  # restored (elapsed_s too): it resumed
    assert [(r["step"], r["split"]) for r in rows][-2:] == [(9, "train"), (9, "val")]
    _same(rows, rows_full)
    got, want = _weights(model), _weights(full)
    assert all(torch.equal(got[k], want[k]) for k in want)
