"""Unit tests for pipeline_lib.preference: BoN pairs and the offline preference trainer.

A tiny GPT-2 (1 layer, 32 dims) with a BPE tokenizer trained on a few dozen strings plays the
reference policy; its cached log-probs come from ``generation.sequence_logprobs`` exactly as in
the pipeline's reference cache.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import polars as pl
import pytest
import torch

from pipeline_lib.generation.hf import sequence_logprobs
from pipeline_lib.math.losses import bonbon_beta, bonbon_loss, dpo_loss, ipo_loss
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.models.loading import build_scratch_policy, train_tokenizer
from pipeline_lib.train.pairs import PAIR_COLUMNS, bon_pairs
from pipeline_lib.train.preference import train_preference
from pipeline_lib.train.preference_objective import (
    PreferenceConfig,
    effective_beta,
    policy_logprobs,
    preference_loss,
)

# ------------------------------------------------------------------------------ bon_pairs


def _samples(proxies: dict[str, list[float]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A samples frame and a proxy frame; sample i of prompt p has response f'{p}-r{i}'."""
    srows, prows = [], []
    for pid, values in proxies.items():
        for i, v in enumerate(values):
            srows.append(dict(prompt_id=pid, sample_idx=i, prompt=f"prompt {pid}",
                              response=f"{pid}-r{i}", response_token_ids=[100 + i, 0],
                              ref_logprob=-float(i) - 1.0))
            prows.append(dict(prompt_id=pid, sample_idx=i, proxy=v))
    return pl.DataFrame(srows), pl.DataFrame(prows)


def _by_prompt(pairs: pl.DataFrame) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in pairs.iter_rows(named=True)}


def test_bon_pairs_best_and_worst_with_all_columns() -> None:
    samples, proxy = _samples({"a": [0.1, 0.9, -0.5, 0.3], "b": [2.0, 1.0, 3.0, 0.0]})
    pairs = bon_pairs(samples, proxy, 4)
    assert tuple(pairs.columns) == PAIR_COLUMNS
    assert pairs["prompt_id"].to_list() == ["a", "b"]
    a, b = _by_prompt(pairs)["a"], _by_prompt(pairs)["b"]
    assert (a["best_idx"], a["worst_idx"]) == (1, 2)
    assert (b["best_idx"], b["worst_idx"]) == (2, 3)
    assert a["n"] == 4 and a["prompt"] == "prompt a"
    assert a["best_response"] == "a-r1" and a["worst_response"] == "a-r2"
    assert a["best_token_ids"] == [101, 0] and a["worst_token_ids"] == [102, 0]
    assert a["best_proxy"] == 0.9 and a["worst_proxy"] == -0.5
    assert a["best_ref_logprob"] == -2.0 and a["worst_ref_logprob"] == -3.0


def test_bon_pairs_are_nested_first_n_by_sample_idx() -> None:
    # Over 4 samples the best is idx 3 and the worst idx 2; over the first 2, idx 1 / idx 0.
    samples, proxy = _samples({"a": [0.2, 0.5, -1.0, 4.0]})
    shuffled = samples.sample(fraction=1.0, shuffle=True, seed=3)  # row order must not matter
    p2 = _by_prompt(bon_pairs(shuffled, proxy.reverse(), 2))["a"]
    p3 = _by_prompt(bon_pairs(shuffled, proxy, 3))["a"]
    p4 = _by_prompt(bon_pairs(shuffled, proxy, 4))["a"]
    assert (p2["best_idx"], p2["worst_idx"]) == (1, 0)
    assert (p3["best_idx"], p3["worst_idx"]) == (1, 2)
    assert (p4["best_idx"], p4["worst_idx"]) == (3, 2)
    assert p2["n"] == 2 and p4["n"] == 4


def test_bon_pairs_uses_only_first_n_even_when_later_samples_are_extreme() -> None:
    samples, proxy = _samples({"a": [1.0, 0.0, 99.0, -99.0, 5.0]})
    p = _by_prompt(bon_pairs(samples, proxy, 2))["a"]
    assert {p["best_idx"], p["worst_idx"]} <= {0, 1}
    assert (p["best_proxy"], p["worst_proxy"]) == (1.0, 0.0)


def test_bon_pairs_tie_breaking() -> None:
    # Max 0.7 at idx 1 and 3 -> best = 1 (smallest); min 0.1 at idx 0 and 2 -> worst = 2 (largest).
    samples, proxy = _samples({"a": [0.1, 0.7, 0.1, 0.7]})
    p = _by_prompt(bon_pairs(samples, proxy, 4))["a"]
    assert (p["best_idx"], p["worst_idx"]) == (1, 2)


def test_bon_pairs_drops_all_tied_prompts(caplog: pytest.LogCaptureFixture) -> None:
    samples, proxy = _samples({"a": [0.3, 0.3, 0.3, 1.0], "b": [0.0, 1.0, 2.0, 3.0]})
    with caplog.at_level(logging.WARNING, logger="pipeline_lib.preference"):
        pairs, dropped = bon_pairs(samples, proxy, 3, return_dropped=True)
    assert dropped == ["a"]
    assert pairs["prompt_id"].to_list() == ["b"]
    assert "dropped 1 of 2" in caplog.text
    # With n = 4 prompt a has a preference again.
    assert bon_pairs(samples, proxy, 4)["prompt_id"].to_list() == ["a", "b"]


def test_bon_pairs_errors() -> None:
    samples, proxy = _samples({"a": [0.1, 0.2, 0.3, 0.4], "short": [0.1, 0.2]})
    with pytest.raises(ValueError, match="'short' has 2 cached samples, fewer than n = 3"):
        bon_pairs(samples, proxy, 3)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        bon_pairs(samples, proxy, 1)
    with pytest.raises(ValueError, match="'a' sample_idx 1 has no proxy reward"):
        bon_pairs(samples, proxy.filter(~((pl.col("prompt_id") == "a")
                                          & (pl.col("sample_idx") == 1))), 2)
    with pytest.raises(ValueError, match="proxy has 2 rows for prompt 'a'"):
        bon_pairs(samples, pl.concat([proxy, proxy.head(1)]), 2)
    nan_proxy = proxy.with_columns(
        pl.when(pl.col("sample_idx") == 0).then(float("nan")).otherwise(pl.col("proxy"))
        .alias("proxy"))
    with pytest.raises(ValueError, match="non-finite proxy"):
        bon_pairs(samples, nan_proxy, 2)
    with pytest.raises(ValueError, match="lacks column"):
        bon_pairs(samples.drop("ref_logprob"), proxy, 2)


# ------------------------------------------------------------------------------ losses / config


def _logps(seed: int, b: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(-10.0 * torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4))


def test_preference_loss_dispatches_to_the_losses_module() -> None:
    args = _logps(0)
    torch.testing.assert_close(
        preference_loss(PreferenceConfig("dpo", beta=0.3, label_smoothing=0.1), *args),
        dpo_loss(*args, beta=0.3, label_smoothing=0.1))
    torch.testing.assert_close(preference_loss(PreferenceConfig("ipo", beta=0.3), *args),
                               ipo_loss(*args, beta=0.3))
    for variant in ("ipo", "dpo_sigmoid"):
        cfg = PreferenceConfig("bonbon", n=4, alpha=0.2, bonbon_variant=variant)
        expected = bonbon_loss(*args, n=4, alpha=0.2, variant=variant)
        torch.testing.assert_close(preference_loss(cfg, *args), expected)
        # An override equal to beta* reproduces the same loss through the other code path.
        cfg_o = PreferenceConfig("bonbon", n=4, alpha=0.2, bonbon_variant=variant,
                                 beta_override=bonbon_beta(4))
        torch.testing.assert_close(preference_loss(cfg_o, *args), expected)
    torch.testing.assert_close(preference_loss(PreferenceConfig("bon_sft"), *args), -args[0])
    assert effective_beta(PreferenceConfig("bonbon", n=8)) == pytest.approx(0.0275482, abs=1e-7)
    assert effective_beta(PreferenceConfig("bonbon", beta_override=0.5)) == 0.5
    assert effective_beta(PreferenceConfig("dpo", beta=0.2)) == 0.2
    assert effective_beta(PreferenceConfig("bon_sft")) is None


@pytest.mark.parametrize(
    "kwargs",
    [dict(method="ppo"), dict(method="dpo", beta=0.0), dict(method="bonbon", n=1),
     dict(method="dpo", label_smoothing=0.6), dict(method="bonbon", bonbon_variant="x"),
     dict(method="dpo", batch_size=0), dict(method="dpo", alpha=1.5)],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PreferenceConfig(**kwargs)


# ------------------------------------------------------------------------------ tiny policy

_GOOD = ["a lovely film", "great acting", "a wonderful story", "truly moving",
         "superb and warm", "the best film"]
_BAD = ["a boring mess", "awful acting", "a dull plot", "truly bad", "weak and cold",
        "the worst film"]
_PROMPTS = ["this movie was", "i think it is", "the plot felt", "overall it was",
            "my friends said", "the cast is", "honestly this was", "the ending was"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> dict:
    texts = [f"{p} {r}" for p in _PROMPTS for r in _GOOD + _BAD]
    tok = train_tokenizer(texts * 2, vocab_size=320)
    torch.manual_seed(0)
    ref = build_scratch_policy(tok, **dict(n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    eos = tok.eos_token_id
    rows = []
    for i, prompt in enumerate(_PROMPTS):
        good, bad = _GOOD[i % len(_GOOD)], _BAD[(i + 2) % len(_BAD)]
        rows.append(dict(
            prompt_id=f"train-{i}", n=8, prompt=prompt,
            best_token_ids=tok(" " + good, add_special_tokens=False)["input_ids"] + [eos],
            worst_token_ids=tok(" " + bad, add_special_tokens=False)["input_ids"] + [eos]))
    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in rows]
    for which in ("best", "worst"):
        lp = sequence_logprobs(ref, prompt_ids, [r[f"{which}_token_ids"] for r in rows],
                               tok.pad_token_id)
        for r, v in zip(rows, lp, strict=True):
            r[f"{which}_ref_logprob"] = float(v)
    return dict(tok=tok, ref=ref, pairs=pl.DataFrame(rows), prompt_ids=prompt_ids)


def _policy(tiny: dict):
    return copy.deepcopy(tiny["ref"])


def _cfg(method: str, **kw) -> PreferenceConfig:
    base = dict(batch_size=8, lr=5e-3, epochs=40, device="cpu", checkpoint_every=1000)
    base.update(kw)
    return PreferenceConfig(method, **base)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_policy_logprobs_equal_sequence_logprobs_at_step_0(tiny: dict) -> None:
    pairs, tok = tiny["pairs"], tiny["tok"]
    responses = pairs["best_token_ids"].to_list() + pairs["worst_token_ids"].to_list()
    prompts = tiny["prompt_ids"] * 2
    policy = _policy(tiny)
    got = policy_logprobs(policy, prompts, responses, tok.pad_token_id)
    assert got.requires_grad  # differentiable: the trainer backpropagates through it
    want = sequence_logprobs(tiny["ref"], prompts, responses, tok.pad_token_id, batch_size=3)
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=0, atol=1e-4)
    assert (want < 0).all()
    # The cached reference log-probs are reproduced, so h = 0 for every response.
    cached = np.concatenate([pairs["best_ref_logprob"].to_numpy(),
                             pairs["worst_ref_logprob"].to_numpy()])
    np.testing.assert_allclose(got.detach().double().numpy(), cached, rtol=0, atol=1e-4)


def test_dpo_starts_at_log2_with_zero_margin(tiny: dict) -> None:
    rows, _ = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"],
                               _cfg("dpo", epochs=1, lr=1e-3), seed=0)
    first = rows[0]
    assert first["step"] == 1 and first["split"] == "train"
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert first["kl_best_k1"] == pytest.approx(0.0, abs=1e-4)
    assert first["chosen_logp"] == pytest.approx(tiny["pairs"]["best_ref_logprob"].mean(),
                                                 abs=1e-4)
    assert first["rejected_logp"] == pytest.approx(tiny["pairs"]["worst_ref_logprob"].mean(),
                                                   abs=1e-4)
    assert first["pairs"] == 8 and first["tokens"] > 0 and first["grad_norm"] > 0
    assert set(first) >= {"step", "epoch", "loss", "lr", "reward_margin", "accuracy",
                          "chosen_logp", "rejected_logp", "kl_best_k1", "elapsed_s"}


@pytest.mark.parametrize(
    "method,kw",
    [("dpo", dict(beta=0.5)), ("ipo", dict(beta=0.1)), ("bonbon", dict(n=8)),
     ("bonbon", dict(n=8, bonbon_variant="dpo_sigmoid"))],
)
def test_pairwise_methods_reduce_loss_and_raise_margin(tiny: dict, method: str, kw: dict) -> None:
    rows, model = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"],
                                   _cfg(method, max_steps=30, **kw), seed=1)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] + 1.0
    assert rows[-1]["accuracy"] == 1.0
    # The margin measured independently on the returned model agrees with the log.
    pairs, tok = tiny["pairs"], tiny["tok"]
    lw = sequence_logprobs(model, tiny["prompt_ids"], pairs["best_token_ids"].to_list(),
                           tok.pad_token_id)
    ll = sequence_logprobs(model, tiny["prompt_ids"], pairs["worst_token_ids"].to_list(),
                           tok.pad_token_id)
    margin = np.mean((lw - pairs["best_ref_logprob"].to_numpy())
                     - (ll - pairs["worst_ref_logprob"].to_numpy()))
    assert margin > 1.0
    assert margin == pytest.approx(rows[-1]["reward_margin"], rel=0.2)


def test_bon_sft_raises_best_response_likelihood(tiny: dict) -> None:
    rows, model = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"],
                                   _cfg("bon_sft", max_steps=25), seed=2)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(-rows[0]["chosen_logp"], rel=1e-6)
    pairs, tok = tiny["pairs"], tiny["tok"]
    after = sequence_logprobs(model, tiny["prompt_ids"], pairs["best_token_ids"].to_list(),
                              tok.pad_token_id)
    before = pairs["best_ref_logprob"].to_numpy()
    assert (after > before + 1.0).all()
    assert rows[-1]["kl_best_k1"] > 1.0


def test_ipo_margin_converges_to_its_target_on_one_pair(tiny: dict) -> None:
    beta = 0.5  # target margin 1 / (2 beta) = 1
    rows, _ = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"].head(1),
                               _cfg("ipo", beta=beta, batch_size=1, lr=5e-3, epochs=40), seed=3)
    assert rows[-1]["reward_margin"] == pytest.approx(1.0 / (2 * beta), abs=0.05)
    assert rows[-1]["loss"] < 1e-2


def test_same_seed_same_weights_other_seed_other_order(tiny: dict) -> None:
    cfg = _cfg("dpo", batch_size=3, max_steps=8, beta=0.5)
    rows_a, a = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=7)
    rows_b, b = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=7)
    _assert_same_weights(a, b)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_b]
    _, c = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=8)
    assert not torch.equal(_weights(a)["transformer.wte.weight"],
                           _weights(c)["transformer.wte.weight"])


class _Killed(RuntimeError):
    pass


def _full_then_killed_at_5(tiny: dict, tmp_path, cfg):
    """An uninterrupted run (checkpoints in ``full/``), then the same run killed at step 5
    (checkpoints in ``run/``); returns the uninterrupted run's (rows, policy)."""
    rows_full, full = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=5,
                                       checkpoint_dir=tmp_path / "full")

    def die_at_5(row: dict) -> None:
        if row["step"] == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=5,
                         checkpoint_dir=tmp_path / "run", on_log=die_at_5)
    return rows_full, full


def test_killed_run_resumes_to_the_same_weights(tiny: dict, tmp_path) -> None:
    cfg = _cfg("ipo", beta=0.5, batch_size=3, max_steps=8, checkpoint_every=3, warmup_steps=2)
    rows_full, full = _full_then_killed_at_5(tiny, tmp_path, cfg)
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["step"] == 3
    seen: list[int] = []
    rows, resumed = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=5,
                                     checkpoint_dir=tmp_path / "run",
                                     on_log=lambda r: seen.append(r["step"]))
    assert seen == [4, 5, 6, 7, 8]
    assert [r["step"] for r in rows] == list(range(1, 9))
    _assert_same_weights(full, resumed)
    for a, b in zip(rows, rows_full, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-12)
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-15)
    last = tmp_path / "run" / "last"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
            "state.json", "log_rows.json"} <= {p.name for p in last.iterdir()}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last"]  # no tmp left over
    assert json.loads((last / "state.json").read_text())["step"] == 8
    assert len(json.loads((last / "log_rows.json").read_text())) == 8


def test_resume_with_more_steps_continues_at_k_plus_1(tiny: dict, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    rows4, _ = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"],
                                _cfg("bonbon", batch_size=4, max_steps=4, checkpoint_every=2),
                                seed=9, checkpoint_dir=ckpt)
    assert [r["step"] for r in rows4] == [1, 2, 3, 4]
    seen: list[int] = []
    rows7, model7 = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"],
                                     _cfg("bonbon", batch_size=4, max_steps=7,
                                          checkpoint_every=2),
                                     seed=9, checkpoint_dir=ckpt,
                                     on_log=lambda r: seen.append(r["step"]))
    assert seen == [5, 6, 7]
    assert [r["step"] for r in rows7] == list(range(1, 8))
    assert rows7[:4] == rows4
    assert rows7[4]["pairs"] == 20 and rows7[4]["epoch"] == pytest.approx(2.5)
    # A finished run is not retrained; its checkpointed weights come back.
    seen.clear()
    rows_again, model_again = train_preference(
        _policy(tiny), tiny["tok"], tiny["pairs"],
        _cfg("bonbon", batch_size=4, max_steps=7, checkpoint_every=2), seed=9,
        checkpoint_dir=ckpt, on_log=lambda r: seen.append(r["step"]))
    assert seen == [] and rows_again == rows7
    _assert_same_weights(model7, model_again)
    # Changing the loss settings on an existing checkpoint is refused.
    with pytest.raises(ValueError, match="cannot resume"):
        train_preference(_policy(tiny), tiny["tok"], tiny["pairs"],
                         _cfg("bonbon", batch_size=4, max_steps=9, alpha=0.5), seed=9,
                         checkpoint_dir=ckpt)


def test_trainer_input_checks(tiny: dict) -> None:
    pairs, tok = tiny["pairs"], tiny["tok"]
    with pytest.raises(ValueError, match=r"built with n = \[8\] but cfg.n = 4"):
        train_preference(_policy(tiny), tok, pairs, _cfg("bonbon", n=4), seed=0)
    long_ids = [list(range(5, 45))] + pairs["best_token_ids"].to_list()[1:]
    with pytest.raises(ValueError, match="'train-0'.*longer than the policy's 32 positions"):
        train_preference(_policy(tiny), tok,
                         pairs.with_columns(pl.Series("best_token_ids", long_ids)),
                         _cfg("dpo"), seed=0)
    with pytest.raises(ValueError, match="empty"):
        train_preference(_policy(tiny), tok, pairs.head(0), _cfg("dpo"), seed=0)


# ------------------------------------------------------------------------------ mixed precision


@pytest.fixture
def fresh_accelerate():
    """accelerate's state is process-global and refuses another ``mixed_precision`` once set:
    start and leave each precision test with a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# The precisions the trainer accepts on CPU: accelerate runs bf16 under CPU autocast and fp16 in
# float32 (it has no fp16 autocast on CPU; the trainer warns).
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["dpo", "ipo", "bonbon"])
def test_h_is_zero_at_step_0_under_each_precision(tiny: dict, fresh_accelerate, tmp_path,
                                                  precision: str, method: str) -> None:
    # One batch of all 8 pairs: step 1's row is computed on the initial policy.
    cfg = _cfg(method, epochs=1, batch_size=8, lr=1e-3, mixed_precision=precision,
               checkpoint_every=1)
    rows, _ = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=0,
                               checkpoint_dir=tmp_path)
    first = rows[0]
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    if precision == "no":
        # The cached float32 values are used unchanged (no recompute: the default run's results
        # are those of before); here they reproduce the policy's forward pass to round-off.
        assert "reference" not in state
        tol = 1e-5
    else:
        # Recomputed with the initial policy through the trainer's own forward pass: exact.
        assert state["reference"]["precision"] == precision
        tol = 0.0
        cached = np.concatenate([tiny["pairs"]["best_ref_logprob"].to_numpy(),
                                 tiny["pairs"]["worst_ref_logprob"].to_numpy()])
        stored = np.concatenate([state["reference"]["chosen"], state["reference"]["rejected"]])
        if precision == "bf16":  # bf16 autocast moves them away from the float32 cache
            assert np.abs(stored - cached).max() > 1e-5
        else:  # fp16 on CPU is float32
            np.testing.assert_allclose(stored, cached, rtol=0, atol=1e-5)
    assert abs(first["kl_best_k1"]) <= tol  # mean h(y_w)
    assert abs(first["reward_margin"]) <= tol  # mean (h(y_w) - h(y_l))
    if tol == 0.0:
        assert first["accuracy"] == 0.0  # every h(y_w) - h(y_l) is exactly 0, none > 0
        beta = effective_beta(cfg)
        if method == "dpo":
            assert first["loss"] == math.log(2.0)
        elif method == "ipo":
            assert first["loss"] == (1.0 / (2 * beta)) ** 2
        else:  # bonbon: alpha * NLL(y_w) + (1 - alpha) * (0 - 1/(2 beta*))^2
            want = (cfg.alpha * -torch.tensor(state["reference"]["chosen"], dtype=torch.float64)
                    + (1 - cfg.alpha) * (1.0 / (2 * beta)) ** 2).mean().item()
            assert first["loss"] == pytest.approx(want, rel=1e-12)


def test_initial_reference_logprobs_are_the_step_0_forward(tiny: dict, fresh_accelerate) -> None:
    """Every pair's log-probs in its epoch-0 batch equal the recomputed reference bitwise,
    under bf16, whatever the batch it falls in (batch 3: batches of 3, 3, 2)."""
    from pipeline_lib.train.pairs import encode_pairs
    from pipeline_lib.train.preference import initial_reference_logprobs
    from pipeline_lib.train.runtime import make_accelerator

    tok = tiny["tok"]
    data = encode_pairs(tiny["pairs"], tok, 32)
    acc = make_accelerator("cpu", "bf16")
    model = acc.prepare(_policy(tiny)).eval()
    ref_c, ref_r = initial_reference_logprobs(model, data, acc, batch_size=3, seed=4,
                                              pad_id=tok.pad_token_id)
    order = np.random.default_rng([4, 0]).permutation(8)
    for idx in (order[0:3], order[3:6], order[6:8]):
        prompts = [data.prompt_ids[i] for i in idx]
        resp = [data.chosen_ids[i] for i in idx] + [data.rejected_ids[i] for i in idx]
        lp = policy_logprobs(model, prompts + prompts, resp, tok.pad_token_id).double()
        assert torch.equal(lp[:len(idx)], torch.as_tensor(ref_c[idx]))
        assert torch.equal(lp[len(idx):], torch.as_tensor(ref_r[idx]))
    # ... and they are bf16 values, not the float32 cache
    assert not np.array_equal(ref_c, data.ref_chosen)


def test_killed_bf16_run_resumes_to_the_same_weights(tiny: dict, fresh_accelerate,
                                                     tmp_path) -> None:
    """The recomputed reference is stored in the checkpoint: a resumed run uses the values of
    the initial weights (not of the resumed ones) and equals the uninterrupted run."""
    cfg = _cfg("dpo", beta=0.5, batch_size=3, max_steps=8, checkpoint_every=3,
               mixed_precision="bf16")
    rows_full, full = _full_then_killed_at_5(tiny, tmp_path, cfg)
    rows, resumed = train_preference(_policy(tiny), tiny["tok"], tiny["pairs"], cfg, seed=5,
                                     checkpoint_dir=tmp_path / "run")
    _assert_same_weights(full, resumed)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_full]
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["kl_best_k1"] == 0.0
