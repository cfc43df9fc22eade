"""Unit tests for pipeline_lib.math.vbon and .ppo_math: vBoN rewards (closed forms, brute-force BoN, a tabular
optimisation) and the PPO pieces (hand-computed GAE / clipping / rewards / KL controller)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline_lib.math.kl import kl_k1, kl_k3
from pipeline_lib.math.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    scheduled_lr,
    token_rewards,
    whiten,
)
from pipeline_lib.math.vbon import (
    log_bon_ratio,
    vbon_beta,
    vbon_n_from_beta,
    vbon_reward_exact,
    vbon_reward_l1,
)

DT = torch.float64


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=DT)


def _cdfs(rewards: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom F = P(R <= r) and F⁻ = P(R < r) of a discrete reward distribution."""
    f_at = np.array([probs[rewards <= r].sum() for r in rewards])
    f_below = np.array([probs[rewards < r].sum() for r in rewards])
    return f_below, f_at


def _brute_force_bon(rewards: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """P(the best of n iid draws from probs is atom y), ties broken uniformly, by enumeration."""
    k = len(probs)
    out = np.zeros(k)
    for tup in itertools.product(range(k), repeat=n):
        w = float(np.prod(probs[list(tup)]))
        best = max(rewards[i] for i in tup)
        winners = [i for i in tup if rewards[i] == best]
        for i in winners:
            out[i] += w / len(winners)
    return out


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


# ============================================================================ vBoN rewards


def test_l1_reward_is_log_and_monotone() -> None:
    cdf = np.array([1 / 11, 2 / 11, 0.5, 0.9, 1.0])
    r = vbon_reward_l1(cdf)
    assert r.dtype == np.float64
    np.testing.assert_allclose(r, np.log(cdf))
    assert np.all(np.diff(r) > 0)
    assert r[-1] == 0.0
    # smoothed empirical CDF of increasing rewards -> increasing reward
    cache = np.sort(np.random.default_rng(0).normal(size=20))
    queries = np.linspace(-3, 3, 50)
    f_hat = (1 + np.searchsorted(cache, queries, side="left")) / (len(cache) + 1)
    assert np.all(np.diff(vbon_reward_l1(f_hat)) >= 0)


def test_log_bon_ratio_no_ties_closed_form() -> None:
    f = np.array([0.01, 0.2, 0.5, 0.999, 1.0])
    for n in (2, 3, 8, 64):
        out = log_bon_ratio(f, f, n)
        np.testing.assert_allclose(out, np.log(n) + (n - 1) * np.log(f), rtol=1e-12)


def test_log_bon_ratio_tiny_tie_mass_tends_to_continuous_limit() -> None:
    f = np.array([0.3, 0.7])
    out = log_bon_ratio(f * (1 - 1e-13), f, 8)
    np.testing.assert_allclose(out, np.log(8 * f**7), rtol=1e-9)


def test_log_bon_ratio_with_ties_hand_value() -> None:
    # F⁻ = 0.25, F = 0.75, n = 2: (0.5625 - 0.0625) / 0.5 = 1 -> log 1 = 0
    assert log_bon_ratio(0.25, 0.75, 2) == pytest.approx(0.0, abs=1e-15)
    # F⁻ = 0.2, F = 0.6, n = 3: (0.216 - 0.008) / 0.4 = 0.52
    assert log_bon_ratio(0.2, 0.6, 3) == pytest.approx(math.log(0.52), rel=1e-12)
    # F⁻ = 0 (lowest reward): F^n / F = F^(n-1)
    assert log_bon_ratio(0.0, 0.4, 5) == pytest.approx(4 * math.log(0.4), rel=1e-12)
    # F⁻ = 0, F = 1 (a single atom): ratio 1 for every n
    assert log_bon_ratio(0.0, 1.0, 7) == pytest.approx(0.0, abs=1e-15)


def test_log_bon_ratio_p_form_equals_distribution_form_for_whole_tie_mass() -> None:
    f_below = np.array([0.0, 0.1, 0.25, 0.6, 0.9])
    f_at = np.array([0.1, 0.25, 0.6, 0.9, 1.0])
    for n in (2, 4, 16):
        np.testing.assert_allclose(
            log_bon_ratio(f_below, None, n, p=f_at - f_below),
            log_bon_ratio(f_below, f_at, n),
            rtol=1e-12,
        )


def test_log_bon_ratio_p_to_zero_limit() -> None:
    fb = np.array([0.05, 0.3, 0.99])
    expected = np.log(8 * fb**7)
    np.testing.assert_allclose(log_bon_ratio(fb, None, 8, p=np.zeros(3)), expected, rtol=1e-12)
    np.testing.assert_allclose(log_bon_ratio(fb, None, 8, p=1e-300), expected, rtol=1e-12)
    np.testing.assert_allclose(log_bon_ratio(fb, None, 8, p=1e-12), expected, rtol=1e-9)
    # F⁻ = 0 with tiny p: ((p)^n) / p = p^(n-1), finite in log space
    assert log_bon_ratio(0.0, None, 3, p=1e-200) == pytest.approx(2 * math.log(1e-200))


def test_log_bon_ratio_is_a_distribution_and_matches_brute_force() -> None:
    rewards = np.array([0.0, 1.0, 1.0, 2.5])  # atoms 1 and 2 tie
    probs = np.array([0.4, 0.15, 0.25, 0.2])
    fb, fa = _cdfs(rewards, probs)
    for n in (1, 2, 3, 5):
        pi_bon = probs * np.exp(log_bon_ratio(fb, fa, n))
        assert pi_bon.sum() == pytest.approx(1.0, abs=1e-12)
    n = 3
    pi_bon = probs * np.exp(log_bon_ratio(fb, fa, n))
    np.testing.assert_allclose(pi_bon, _brute_force_bon(rewards, probs, n), atol=1e-12)
    # tied atoms share the tie's BoN mass in proportion to pi_ref
    assert pi_bon[1] / pi_bon[2] == pytest.approx(0.15 / 0.25)


def test_log_bon_ratio_brute_force_without_ties() -> None:
    rewards = np.array([3.0, -1.0, 0.5, 2.0])
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    fb, fa = _cdfs(rewards, probs)
    pi_bon = probs * np.exp(log_bon_ratio(fb, fa, 3))
    np.testing.assert_allclose(pi_bon, _brute_force_bon(rewards, probs, 3), atol=1e-12)
    assert pi_bon.sum() == pytest.approx(1.0, abs=1e-12)


def test_vbon_reward_exact_scales() -> None:
    fb, fa, n = np.array([0.2, 0.5]), np.array([0.6, 0.5]), 4
    lbr = log_bon_ratio(fb, fa, n)
    np.testing.assert_allclose(vbon_reward_exact(fb, fa, n), lbr / 3)
    np.testing.assert_allclose(vbon_reward_exact(fb, fa, n, scale="n"), lbr / 4)
    # no ties / tiny p: exact reward ≈ log F + log(n)/(n-1)
    f = np.array([0.1, 0.8])
    np.testing.assert_allclose(
        vbon_reward_exact(f, None, 8, p=1e-30), np.log(f) + np.log(8) / 7, rtol=1e-12
    )


def test_vbon_beta_roundtrip() -> None:
    assert vbon_beta(8) == pytest.approx(1 / 7)
    assert vbon_n_from_beta(1 / 7) == pytest.approx(8.0)
    assert vbon_n_from_beta(vbon_beta(33)) == pytest.approx(33.0)


def _optimise_tabular(
    reward: np.ndarray, pi_ref: np.ndarray, beta: float, steps: int = 600
) -> np.ndarray:
    """argmax_pi E_pi[reward] - beta KL(pi || pi_ref) over a categorical, by Adam on logits."""
    log_ref = torch.log(_t(pi_ref))
    rew = _t(reward)
    logits = log_ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        logp = torch.log_softmax(logits, dim=0)
        pi = logp.exp()
        objective = (pi * rew).sum() - beta * (pi * (logp - log_ref)).sum()
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    return torch.softmax(logits.detach(), dim=0).numpy()


def test_tabular_vbon_exact_bound_recovers_bon_and_l1_moves_towards_it() -> None:
    rewards = np.array([-1.0, 0.2, 0.2, 0.9, 1.4, 2.0])  # atoms 1 and 2 tie
    pi_ref = np.array([0.3, 0.1, 0.2, 0.15, 0.15, 0.1])
    n = 4
    beta = vbon_beta(n)
    fb, fa = _cdfs(rewards, pi_ref)
    # target: pi_ref * [F^n - F⁻^n] / [F - F⁻] per atom (tie shared in proportion to pi_ref)
    pi_bon = pi_ref * (fa**n - fb**n) / (fa - fb)
    assert pi_bon.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pi_bon, _brute_force_bon(rewards, pi_ref, n), atol=1e-12)

    pi_exact = _optimise_tabular(vbon_reward_exact(fb, fa, n), pi_ref, beta)
    assert _tv(pi_exact, pi_bon) < 0.01

    pi_l1 = _optimise_tabular(vbon_reward_l1(fa), pi_ref, beta)
    tv_ref = _tv(pi_ref, pi_bon)
    assert _tv(pi_l1, pi_bon) < tv_ref
    assert _tv(pi_l1, pi_bon) < 0.5 * tv_ref
    # l1 optimum is pi_ref F^(n-1) normalised
    l1_opt = pi_ref * fa ** (n - 1)
    assert _tv(pi_l1, l1_opt / l1_opt.sum()) < 0.01


# ============================================================================ PPO pieces


def test_gae_hand_computed_three_steps() -> None:
    # row 0: 3 valid tokens; row 1: same, plus a padded position with garbage
    rewards = _t([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 5.0]])
    values = _t([[0.5, 0.6, 0.7, 0.0], [0.5, 0.6, 0.7, 9.0]])
    mask = _t([[1, 1, 1, 0], [1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta_2 = 1 - 0.7 = 0.3 ; A_2 = 0.3
    # delta_1 = 0 + 0.7 - 0.6 = 0.1 ; A_1 = 0.1 + 0.95 * 0.3 = 0.385
    # delta_0 = 0 + 0.6 - 0.5 = 0.1 ; A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    expected_adv = _t([0.46575, 0.385, 0.3, 0.0])
    expected_ret = _t([0.96575, 0.985, 1.0, 0.0])
    for row in range(2):
        torch.testing.assert_close(adv[row], expected_adv)
        torch.testing.assert_close(ret[row], expected_ret)


def test_gae_gamma_lambda_one_is_monte_carlo() -> None:
    rewards = _t([[0.1, -0.2, 0.3, 2.0], [1.0, 0.5, 0.0, 0.0]])
    values = _t([[0.3, 0.1, -0.4, 0.2], [0.7, 0.2, 0.0, 3.0]])
    mask = _t([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # returns = reward-to-go over valid tokens
    torch.testing.assert_close(ret, _t([[2.2, 2.1, 2.3, 2.0], [1.5, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(adv, (ret - values) * mask)


def test_whiten_masked() -> None:
    x = _t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = _t([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert valid.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(w[~mask.bool()] == 0)
    w2 = whiten(x, mask, shift_mean=False)
    assert w2[mask.bool()].mean().item() == pytest.approx(3.0)  # mean of 1..5
    torch.testing.assert_close(w2[mask.bool()] - 3.0, valid)


def test_ppo_policy_loss_hand_cases_and_clipped_gradients() -> None:
    old = torch.zeros(1, 5, dtype=DT)
    ratios = [1.5, 0.5, 0.5, 1.5, 9.0]
    logp = torch.log(_t([ratios])).requires_grad_(True)
    adv = _t([[1.0, 1.0, -1.0, -1.0, 123.0]])
    mask = _t([[1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): [-1.2 (clipped), -0.5, 0.8 (clipped), 1.5]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    lr = np.log([1.5, 0.5, 0.5, 1.5])
    assert approx_kl.item() == pytest.approx(0.5 * np.mean(lr**2))
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens; zero on clipped and masked tokens
    torch.testing.assert_close(logp.grad, _t([[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]]))


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage() -> None:
    logp = _t([[-1.0, -2.0, -0.5]])
    adv = _t([[0.5, -1.0, 2.0]])
    loss, clipfrac, kl = ppo_policy_loss(logp, logp.clone(), adv, torch.ones(1, 3, dtype=DT))
    assert loss.item() == pytest.approx(-1.5 / 3)
    assert clipfrac.item() == 0.0 and kl.item() == 0.0


def test_ppo_value_loss_hand_cases() -> None:
    old = torch.zeros(1, 4, dtype=DT)
    values = _t([[0.5, 0.1, -0.5, 42.0]]).requires_grad_(True)
    returns = _t([[1.0, 1.0, 1.0, 0.0]])
    mask = _t([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # v=0.5 -> clipped 0.2: max(0.25, 0.64)=0.64 ; v=0.1: 0.81 ; v=-0.5 -> -0.2: max(2.25, 1.44)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    # grad 0.5 * 2 (v - R) / 3 on the unclipped terms, 0 on the clipped one and the padding
    torch.testing.assert_close(values.grad, _t([[0.0, -0.9 / 3, -1.5 / 3, 0.0]]))


def test_token_rewards_places_sequence_reward_at_last_valid_token() -> None:
    logp = _t([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -0.5, -0.5], [-1.0, -1.0, -1.0, -1.0]])
    ref = _t([[-1.5, -2.0, -2.0, -9.0], [-1.0, -0.5, -0.5, -0.5], [-1.0, -2.0, -1.0, -3.0]])
    mask = _t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    seq = _t([2.0, -5.0, 0.5])
    out = token_rewards(seq, logp, ref, mask, kl_coef=0.1, reward_clip=3.0)
    expected = _t(
        [
            [-0.05, 0.0, 0.1 + 2.0, 0.0],
            [-0.05 - 3.0, 0.0, 0.0, 0.0],
            [0.0, -0.1, 0.0, -0.2 + 0.5],
        ]
    )
    torch.testing.assert_close(out, expected)
    unclipped = token_rewards(seq, logp, ref, mask, kl_coef=0.0)
    torch.testing.assert_close(unclipped.sum(dim=1), seq)
    assert unclipped[1, 0].item() == -5.0


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # clipped +0.2
    assert ctl.value > 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(3.0, 256)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    assert ctl.value < 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(6.6, 100)  # error +0.1 (inside the clip)
    assert ctl.value == pytest.approx(0.1 * 1.1)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


def test_scheduled_lr_hand_values() -> None:
    """Iteration t of T at progress p = t/T: constant lr; linear lr·(1 − (1 − f)·p); cosine
    lr·(f + (1 − f)·(1 + cos πp)/2)."""
    assert [scheduled_lr(2.0, t, 4, "constant") for t in range(4)] == [2.0] * 4
    assert [scheduled_lr(2.0, t, 4, "linear") for t in range(4)] == pytest.approx(
        [2.0, 1.5, 1.0, 0.5])
    assert [scheduled_lr(2.0, t, 4, "linear", 0.5) for t in range(4)] == pytest.approx(
        [2.0, 1.75, 1.5, 1.25])
    assert [scheduled_lr(1.0, t, 4, "cosine") for t in range(4)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])
    assert scheduled_lr(1.0, 2, 4, "cosine", 0.2) == pytest.approx(0.6)
    assert scheduled_lr(1.0, 0, 1, "linear") == 1.0  # one iteration: the full lr
    decreasing = [scheduled_lr(1.0, t, 50, s, 0.1) for s in ("linear", "cosine")
                  for t in range(50)]
    assert all(0.1 < x <= 1.0 for x in decreasing)
    for bad in (dict(schedule="step"), dict(final_fraction=1.5), dict(step=4), dict(step=-1)):
        args = dict(lr=1.0, step=0, total=4, schedule="linear") | bad
        with pytest.raises(ValueError):
            scheduled_lr(**args)


def test_masked_mean_and_entropy() -> None:
    x = _t([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    mask = _t([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), _t([1.5, 4.0]))
    logits = torch.zeros(2, 3, 5, dtype=DT)
    logits[1, 1] = torch.tensor([3.0, -1.0, 0.0, 0.5, 2.0])
    logits[1, 2] = 1e4  # ignored (masked)
    ent = entropy_from_logits(logits, _t([[1, 1, 1], [1, 1, 0]]))
    h = torch.distributions.Categorical(logits=logits[1, 1]).entropy().item()
    assert ent.item() == pytest.approx((4 * math.log(5) + h) / 5)


def test_kl_estimators() -> None:
    logp = _t([-1.0, -2.0, -0.1])
    torch.testing.assert_close(kl_k3(logp, logp), torch.zeros(3, dtype=DT))
    torch.testing.assert_close(kl_k1(logp, logp), torch.zeros(3, dtype=DT))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g, dtype=DT) * 3, torch.randn(1000, generator=g, dtype=DT)
    assert torch.all(kl_k3(a, b) >= 0)
    # exact expectations under pi: E_pi[k1] = E_pi[k3] = KL(pi || pi_ref)
    pi_logp = torch.log_softmax(_t([0.3, -1.0, 2.0, 0.0]), 0)
    ref_logp = torch.log_softmax(_t([1.0, 0.5, -0.5, 0.2]), 0)
    kl = (pi_logp.exp() * (pi_logp - ref_logp)).sum()
    torch.testing.assert_close((pi_logp.exp() * kl_k1(pi_logp, ref_logp)).sum(), kl)
    torch.testing.assert_close((pi_logp.exp() * kl_k3(pi_logp, ref_logp)).sum(), kl)


# ============================================================================ validation


def test_vbon_validation() -> None:
    with pytest.raises(ValueError, match="cdf_values"):
        vbon_reward_l1([0.0, 0.5])
    with pytest.raises(ValueError, match="cdf_values"):
        vbon_reward_l1([1.2])
    with pytest.raises(ValueError, match="f_at"):
        log_bon_ratio(0.6, 0.5, 4)
    with pytest.raises(ValueError, match="f_at"):
        log_bon_ratio(0.2, None, 4)
    with pytest.raises(ValueError, match="f_below"):
        log_bon_ratio(-0.1, 0.5, 4)
    with pytest.raises(ValueError, match="p"):
        log_bon_ratio(0.8, None, 4, p=0.5)
    with pytest.raises(ValueError, match="n must"):
        log_bon_ratio(0.2, 0.5, 0.5)
    with pytest.raises(ValueError, match="scale"):
        vbon_reward_exact(0.2, 0.5, 4, scale="m")
    with pytest.raises(ValueError, match="n must"):
        vbon_reward_exact(0.2, 0.5, 1)
    with pytest.raises(ValueError, match="n must"):
        vbon_beta(1)
    with pytest.raises(ValueError, match="beta"):
        vbon_n_from_beta(0.0)


def test_ppo_validation() -> None:
    a = torch.zeros(2, 3, dtype=DT)
    m = torch.ones(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="mask"):
        gae_advantages(a, a, torch.ones(2, 2))
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(a, a, m, lam=1.5)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(a, a, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="clip"):
        ppo_value_loss(a, a, a, m, clip=0.0)
    with pytest.raises(ValueError, match="sequence_reward"):
        token_rewards(torch.zeros(3), a, a, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(torch.zeros(2), a, a, m, kl_coef=-0.1)
    with pytest.raises(ValueError, match="valid token"):
        token_rewards(torch.zeros(2), a, a, _t([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
