"""Unit tests for pipeline_lib.ppo: a tiny GPT-2 and a word-level tokenizer, real PPO runs.

The tiny policy is randomly initialised (nearly uniform over 19 tokens), so rewarding one token
gives PPO a clear signal within a few dozen steps. Runs use one torch thread: tiny models are far
slower with several threads contending on a small CI machine.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support.word_lm import PROMPTS, tiny_gpt2, word_tokenizer

from pipeline_lib.generation.hf import sequence_logprobs
from pipeline_lib.math.cdf import empirical_cdf
from pipeline_lib.math.vbon import vbon_beta, vbon_reward_l1
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.train.ppo.checkpoint import load_checkpoint_policy
from pipeline_lib.train.ppo.config import PPOConfig
from pipeline_lib.train.ppo.policy import PolicyWithValueHead, set_trainable_top_layers
from pipeline_lib.train.ppo.rollout import sft_nll
from pipeline_lib.train.ppo.trainer import train_ppo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


make_model = tiny_gpt2


def target_reward(tok, word: str = "c"):
    """Sequence reward = fraction of response tokens equal to ``word``'s id."""
    target = tok.convert_tokens_to_ids(word)

    def reward_fn(idx, texts, ids):
        return np.array([np.mean([t == target for t in r]) for r in ids], dtype=np.float64)

    return reward_fn


def cfg(**kw) -> PPOConfig:
    base = dict(steps=6, rollout_batch_size=16, minibatch_size=8, ppo_epochs=2, lr=3e-3,
                kl_coef=0.01, max_new_tokens=8, device="cpu", checkpoint_every=0)
    base.update(kw)
    return PPOConfig(**base)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def mean_of(rows, key, sl):
    return float(np.mean([r[key] for r in rows[sl]]))


# ------------------------------------------------------------------------------ learning


@pytest.fixture(scope="module")
def small_beta_run(tok):
    rows, policy = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                             cfg(steps=40, kl_coef=0.01), seed=0)
    return rows, policy


def test_reward_increases_with_finite_kl(small_beta_run) -> None:
    rows, policy = small_beta_run
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = mean_of(rows, "reward", slice(0, 5)), mean_of(rows, "reward", slice(-5, None))
    assert first < 0.2  # ~1/19 under the random initial policy
    assert last > first + 0.4
    assert all(math.isfinite(r["kl_k1"]) and math.isfinite(r["kl_k3"]) for r in rows)
    assert mean_of(rows, "kl_k1", slice(-5, None)) > 1.0  # it moved away from the reference
    assert all(r["kl_k3"] >= 0 for r in rows)
    # entropy collapses as the policy concentrates on the rewarded token
    assert mean_of(rows, "entropy", slice(-5, None)) < mean_of(rows, "entropy", slice(0, 5))
    for r in rows:
        assert r["score"] == r["reward"]
        assert r["kl_coef"] == pytest.approx(0.01)
        assert r["lr"] == pytest.approx(3e-3)
        assert 1 <= r["response_length"] <= 8
        assert 0.0 <= r["clipfrac"] <= 1.0
        for key in ("loss", "policy_loss", "value_loss", "elapsed_s"):
            assert math.isfinite(r[key])
    assert not policy.training and isinstance(policy, torch.nn.Module)
    assert type(policy).__name__ == "GPT2LMHeadModel"


def test_first_rollout_is_on_reference(tok) -> None:
    """At step 1 the policy equals the reference: k1 and k3 are exactly ~0."""
    rows, _ = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(steps=1), seed=3)
    assert abs(rows[0]["kl_k1"]) < 1e-5 and abs(rows[0]["kl_k3"]) < 1e-6


def test_large_kl_coef_stays_close_to_reference(tok, small_beta_run) -> None:
    rows, _ = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                        cfg(steps=30, kl_coef=5.0), seed=0)
    small_rows, _ = small_beta_run
    kl3 = mean_of(rows, "kl_k3", slice(-5, None))
    assert kl3 < 0.1
    assert kl3 < 0.1 * mean_of(small_rows, "kl_k3", slice(-5, None))
    assert abs(mean_of(rows, "kl_k1", slice(-5, None))) < 1.0
    assert mean_of(rows, "reward", slice(-5, None)) < 0.3


def test_adaptive_kl_controller_raises_beta_above_target(tok) -> None:
    rows, _ = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                        cfg(steps=5, kl_coef=0.01, adaptive_kl=True, kl_target=0.01,
                            kl_horizon=100), seed=0)
    betas = [r["kl_coef"] for r in rows]
    assert betas[0] == pytest.approx(0.01)
    assert betas[-1] > betas[0]  # measured KL > target -> beta grows


def test_vbon_reward_fn_with_l1_bound(tok) -> None:
    """vBoN: R = log F̂(r) against a per-prompt reward pool, beta = 1/(n - 1)."""
    rng = np.random.default_rng(0)
    pools = [np.sort(rng.uniform(0.0, 0.3, size=15)) for _ in PROMPTS]  # "reference cache"
    raw = target_reward(tok)
    seen = []

    def reward_fn(idx, texts, ids):
        r = raw(idx, texts, ids)
        cdf = np.array([empirical_cdf(pools[i], [x])[0] for i, x in zip(idx, r, strict=True)])
        out = vbon_reward_l1(cdf)
        seen.append(float(out.mean()))
        return out

    n = 4
    rows, _ = train_ppo(make_model(tok), tok, PROMPTS, reward_fn,
                        cfg(steps=30, kl_coef=vbon_beta(n)), seed=0)
    assert [r["reward"] for r in rows] == pytest.approx(seen)
    assert all(r["reward"] <= 0 for r in rows)  # log F̂ <= 0
    assert rows[0]["kl_coef"] == pytest.approx(1 / 3)
    assert mean_of(rows, "reward", slice(-5, None)) > mean_of(rows, "reward", slice(0, 5)) + 0.5
    assert all(math.isfinite(r["kl_k1"]) for r in rows)


# ------------------------------------------------------------------------------ rollout


def test_reward_fn_gets_trimmed_decoded_responses(tok) -> None:
    calls = []

    def reward_fn(idx, texts, ids):
        calls.append((idx.copy(), list(texts), [list(r) for r in ids]))
        return np.zeros(len(ids))

    train_ppo(make_model(tok), tok, PROMPTS, reward_fn,
              cfg(steps=2, rollout_batch_size=5, minibatch_size=5, ppo_epochs=1), seed=1)
    assert len(calls) == 2
    eos = tok.eos_token_id
    for idx, texts, ids in calls:
        assert idx.dtype.kind == "i" and len(idx) == 5 and len(set(idx.tolist())) == 5
        for text, r in zip(texts, ids, strict=True):
            assert 1 <= len(r) <= 8
            assert eos not in r[:-1]  # cut after the first EOS
            if r[-1] != eos:
                assert len(r) == 8  # unfinished: all max_new_tokens kept
            assert text == tok.decode(r, skip_special_tokens=True)
            assert "<|endoftext|>" not in text
    # prompts are cycled through a shuffled order: 10 draws over 8 prompts cover all of them
    drawn = np.concatenate([c[0] for c in calls])
    assert set(drawn[:8].tolist()) == set(range(8))


def test_reward_fn_must_return_one_finite_reward_per_prompt(tok) -> None:
    with pytest.raises(ValueError, match="reward_fn"):
        train_ppo(make_model(tok), tok, PROMPTS, lambda i, t, r: np.zeros(3), cfg(steps=1), seed=0)
    with pytest.raises(ValueError, match="reward_fn"):
        train_ppo(make_model(tok), tok, PROMPTS, lambda i, t, r: np.full(len(r), np.nan),
                  cfg(steps=1), seed=0)


def test_response_logprobs_align_with_sequence_logprobs(tok) -> None:
    """The trainer's right-padded response log-probs match generation.sequence_logprobs."""
    model = make_model(tok, n_layer=2, seed=5)
    prompts = [encode_prompt(tok, p) for p in ("a b", "c d e f g", "h")]
    responses = [[4, 5, 0], [6], [7, 8, 9, 10, 0]]
    expected = sequence_logprobs(model, prompts, responses, tok.pad_token_id)
    got = sft_nll(model, list(zip(prompts, responses, strict=True)), tok.pad_token_id)
    np.testing.assert_allclose(-got, expected, rtol=1e-5, atol=1e-5)


def test_value_head_is_zero_initialised(tok) -> None:
    model = PolicyWithValueHead(make_model(tok))
    ids = torch.tensor([[0, 3, 4, 5]])
    logits, values = model(ids, torch.ones_like(ids))
    assert logits.shape == (1, 4, len(tok)) and values.shape == (1, 4)
    assert torch.all(values == 0)


# ------------------------------------------------------------------------------ frozen layers


def test_trainable_top_layers_freezes_lower_blocks(tok) -> None:
    model = make_model(tok, n_layer=2)
    before = state(model)
    names = set_trainable_top_layers(make_model(tok, n_layer=2), 1)
    assert any(n.startswith("transformer.h.1.") for n in names)
    assert not any(n.startswith("transformer.h.0.") for n in names)
    assert "transformer.ln_f.weight" in names and "transformer.wte.weight" not in names

    _, policy = train_ppo(model, tok, PROMPTS, target_reward(tok),
                          cfg(steps=3, trainable_top_layers=1), seed=0)
    after = state(policy)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        frozen = k.startswith(("transformer.h.0.", "transformer.wte", "transformer.wpe",
                               "lm_head"))  # lm_head is tied to wte
        if frozen:
            assert not changed, k
    assert not torch.equal(before["transformer.h.1.mlp.c_fc.weight"],
                           after["transformer.h.1.mlp.c_fc.weight"])
    assert not torch.equal(before["transformer.ln_f.weight"], after["transformer.ln_f.weight"])


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_weights_and_different_seed_differs(tok) -> None:
    rows_a, pol_a = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(), seed=7)
    rows_b, pol_b = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(), seed=7)
    assert_same_weights(state(pol_a), state(pol_b))
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_b]
    _, pol_c = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(), seed=8)
    assert not torch.equal(pol_a.transformer.h[0].mlp.c_fc.weight,
                           pol_c.transformer.h[0].mlp.c_fc.weight)


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def uninterrupted(tok):
    rows, policy = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(), seed=11)
    return rows, state(policy)


def test_resume_after_stop_continues_and_matches(tok, tmp_path, uninterrupted) -> None:
    ref_rows, ref_state = uninterrupted
    seen = []
    train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(steps=3), seed=11,
              checkpoint_dir=tmp_path, on_log=lambda r: seen.append(r["step"]))
    assert seen == [1, 2, 3]
    saved = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert saved["step"] == 3 and len(saved["rows"]) == 3

    seen.clear()
    rows, policy = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(steps=6),
                             seed=11, checkpoint_dir=tmp_path,
                             on_log=lambda r: seen.append(r["step"]))
    assert seen == [4, 5, 6]  # continues at k + 1; on_log only sees new rows
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["reward"] for r in rows] == [r["reward"] for r in ref_rows]
    assert_same_weights(state(policy), ref_state)  # exact on CPU


def crash_on_call(reward_fn, k: int):
    """``reward_fn`` that raises KeyboardInterrupt (a killed job) on its ``k``-th call."""
    calls = {"n": 0}

    def crashing(idx, texts, ids):
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt("killed")
        return reward_fn(idx, texts, ids)

    return crashing


def test_resume_after_crash_mid_run(tok, tmp_path, uninterrupted) -> None:
    ref_rows, ref_state = uninterrupted
    inner = target_reward(tok)
    crashing = crash_on_call(inner, 6)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(make_model(tok), tok, PROMPTS, crashing, cfg(steps=6, checkpoint_every=2),
                  seed=11, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "last" / "trainer_state.json").read_text())["step"] == 4
    rows, policy = train_ppo(make_model(tok), tok, PROMPTS, inner,
                             cfg(steps=6, checkpoint_every=2), seed=11, checkpoint_dir=tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["reward"] for r in rows] == [r["reward"] for r in ref_rows]
    assert_same_weights(state(policy), ref_state)


def test_lr_schedule_is_applied_per_iteration_and_survives_a_resume(tok, tmp_path) -> None:
    """A linear schedule: iteration t of 6 runs at lr·(1 − 0.9·t/6) (lr_final = 0.1); a run
    killed after its step-4 checkpoint resumes on the same schedule, to the same weights."""
    sched = dict(steps=6, checkpoint_every=2, lr_schedule="linear", lr_final=0.1)
    rows, policy = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(**sched),
                             seed=3)
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * (1 - 0.9 * t / 6) for t in range(6)])
    inner = target_reward(tok)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(make_model(tok), tok, PROMPTS, crash_on_call(inner, 6), cfg(**sched), seed=3,
                  checkpoint_dir=tmp_path)
    resumed, policy2 = train_ppo(make_model(tok), tok, PROMPTS, inner, cfg(**sched), seed=3,
                                 checkpoint_dir=tmp_path)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in rows])
    assert_same_weights(state(policy2), state(policy))
    constant = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                         cfg(steps=6), seed=3)[1]
    assert not torch.equal(state(constant)["transformer.h.0.mlp.c_fc.weight"],
                           state(policy)["transformer.h.0.mlp.c_fc.weight"])


def test_checkpoint_contents(tok, tmp_path) -> None:
    from safetensors.torch import load_file

    rows, policy = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                             cfg(steps=2, checkpoint_every=1), seed=0, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no tmp / old dirs left
    last = tmp_path / "last"
    vh = load_file(str(last / "value_head.safetensors"))
    assert set(vh) == {"weight", "bias"} and vh["weight"].shape == (1, 32)
    assert not torch.all(vh["weight"] == 0)  # trained
    opt = torch.load(last / "optimizer.pt", weights_only=True)
    assert opt["state"] and opt["param_groups"][0]["lr"] == pytest.approx(3e-3)
    rng = torch.load(last / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 1 and isinstance(rng["ranks"][0]["cpu"], torch.Tensor)
    st = json.loads((last / "trainer_state.json").read_text())
    assert st["step"] == 2 and st["kl_coef"] == pytest.approx(0.01) and st["rows"] == rows
    assert st["numpy_rng"]["bit_generator"] == "PCG64"
    reloaded = load_checkpoint_policy(tmp_path)
    assert_same_weights(state(reloaded), state(policy))

    (tmp_path / ".last.tmp-dead").mkdir()  # a save killed half-way is ignored and cleared
    rows2, _ = train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                         cfg(steps=2), seed=0, checkpoint_dir=tmp_path)
    assert rows2 == rows and not (tmp_path / ".last.tmp-dead").exists()
    with pytest.raises(ValueError, match="same prompts"):
        train_ppo(make_model(tok), tok, PROMPTS[:5], target_reward(tok), cfg(steps=3), seed=0,
                  checkpoint_dir=tmp_path)


# ------------------------------------------------------------------------------ BOND mix


def test_sft_weight_increases_likelihood_of_sft_examples(tok) -> None:
    eos = tok.eos_token_id
    d_id = tok.convert_tokens_to_ids("d")
    examples = [(encode_prompt(tok, p), [d_id, d_id, d_id, eos]) for p in PROMPTS]
    pad = tok.pad_token_id
    nll_before = sft_nll(make_model(tok), examples, pad).mean()

    def run(w):
        return train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok),
                         cfg(steps=8, sft_weight=w, lr=1e-3), seed=0, sft_examples=examples)

    rows_mix, pol_mix = run(0.5)
    rows_ppo, pol_ppo = run(0.0)
    nll_mix = sft_nll(pol_mix, examples, pad).mean()
    nll_ppo = sft_nll(pol_ppo, examples, pad).mean()
    assert nll_mix < nll_before - 1.0
    assert nll_mix < nll_ppo - 1.0
    assert all(r["sft_nll"] is not None for r in rows_mix)
    assert rows_mix[-1]["sft_nll"] < rows_mix[0]["sft_nll"]
    assert all(r["sft_nll"] is None for r in rows_ppo)


def test_sft_weight_needs_examples(tok) -> None:
    with pytest.raises(ValueError, match="sft_examples"):
        train_ppo(make_model(tok), tok, PROMPTS, target_reward(tok), cfg(sft_weight=0.5), seed=0)


# ------------------------------------------------------------------------------ config


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(steps=1, rollout_batch_size=4, minibatch_size=8)
    with pytest.raises(ValueError, match="sft_weight"):
        PPOConfig(steps=1, rollout_batch_size=4, minibatch_size=4, sft_weight=1.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        PPOConfig(steps=1, rollout_batch_size=4, minibatch_size=4, lr_schedule="step")
    with pytest.raises(ValueError, match="lr_final"):
        PPOConfig(steps=1, rollout_batch_size=4, minibatch_size=4, lr_final=2.0)
    with pytest.raises(ValueError, match="unknown keys"):
        PPOConfig.from_mapping({"steps": 1, "rollout_batch_size": 4, "minibatch_size": 4,
                                "kl_coeff": 0.1})
    c = PPOConfig.from_mapping({"steps": 1, "rollout_batch_size": 4, "minibatch_size": 2})
    assert (c.ppo_epochs, c.clip, c.gamma, c.lam, c.temperature) == (4, 0.2, 1.0, 0.95, 1.0)
