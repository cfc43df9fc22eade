"""Unit tests for pipeline_lib.math.losses: hand-computed values and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.math.losses import (
    bonbon_beta,
    bonbon_loss,
    bond_loss,
    bradley_terry_loss,
    dpo_loss,
    harmonic_number,
    ipo_loss,
    sft_loss,
)


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _full(b: int, value: float) -> torch.Tensor:
    return torch.full((b,), value, dtype=torch.float64)


def _pairs(delta: float, b: int = 3) -> tuple[torch.Tensor, ...]:
    """Four (B,) tensors whose log-ratio margin Delta equals ``delta`` for every example."""
    pc = torch.linspace(-30.0, -10.0, b, dtype=torch.float64)
    pr = torch.linspace(-25.0, -12.0, b, dtype=torch.float64)
    rc = pc - 0.7  # h(y_w) = 0.7
    rr = pr - (0.7 - delta)  # h(y_l) = 0.7 - delta
    return pc, pr, rc, rr


# ------------------------------------------------------------------------------------- DPO


def test_dpo_zero_margin_is_log2_per_example() -> None:
    loss = dpo_loss(*_pairs(0.0, b=4), beta=0.1)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, _full(4, math.log(2.0)))


def test_dpo_zero_margin_is_log2_with_label_smoothing() -> None:
    loss = dpo_loss(*_pairs(0.0), beta=0.5, label_smoothing=0.3)
    torch.testing.assert_close(loss, _full(3, math.log(2.0)))


def test_dpo_hand_value() -> None:
    # Delta = 2, beta = 0.5 -> logits = 1: loss = log(1 + e^-1)
    loss = dpo_loss(*_pairs(2.0), beta=0.5)
    torch.testing.assert_close(loss, _full(3, math.log1p(math.exp(-1.0))))


def test_dpo_label_smoothing_hand_value() -> None:
    # Delta = 2, beta = 0.5, eps = 0.1:
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    loss = dpo_loss(*_pairs(2.0), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(loss, _full(3, expected))
    assert abs(expected - 0.413262) < 1e-6  # 0.9 * 0.313262 + 0.1 * 1.313262


def test_dpo_per_example_margins() -> None:
    pc, pr = _t(-1.0, -2.0), _t(-3.0, -1.0)
    rc, rr = _t(-1.5, -2.0), _t(-3.0, -2.0)
    # Delta_0 = 0.5 - 0 = 0.5, Delta_1 = 0 - 1 = -1 ; beta = 2
    loss = dpo_loss(pc, pr, rc, rr, beta=2.0)
    expected = _t(math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0)))
    torch.testing.assert_close(loss, expected)


def test_dpo_gradient_sign() -> None:
    pc, pr, rc, rr = _pairs(0.3)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.1).sum().backward()
    assert torch.all(pc.grad < 0)  # raising the chosen log-prob lowers the loss
    assert torch.all(pr.grad > 0)  # raising the rejected log-prob raises it
    # and numerically: a larger chosen logp gives a smaller loss
    base = dpo_loss(*_pairs(0.3), beta=0.1)
    pc2, pr2, rc2, rr2 = _pairs(0.3)
    assert torch.all(dpo_loss(pc2 + 1.0, pr2, rc2, rr2, beta=0.1) < base)


def test_dpo_is_stable_for_huge_margins() -> None:
    loss = dpo_loss(*_pairs(-1e4, b=2), beta=1.0)
    assert torch.all(torch.isfinite(loss))
    torch.testing.assert_close(loss, _full(2, 1e4))
    assert torch.all(dpo_loss(*_pairs(1e4, b=2), beta=1.0) < 1e-12)


# ------------------------------------------------------------------------------------- IPO


def test_ipo_zero_at_target_margin() -> None:
    beta = 0.25  # target 1/(2 beta) = 2
    loss = ipo_loss(*_pairs(2.0), beta=beta)
    torch.testing.assert_close(loss, _full(3, 0.0))


def test_ipo_hand_value() -> None:
    # Delta = 0.5, beta = 0.1 -> target 5 -> (0.5 - 5)^2 = 20.25
    loss = ipo_loss(*_pairs(0.5), beta=0.1)
    torch.testing.assert_close(loss, _full(3, 20.25))


# ------------------------------------------------------------------------------------- BoNBoN


def test_harmonic_number() -> None:
    assert harmonic_number(0) == 0.0
    assert harmonic_number(1) == 1.0
    assert harmonic_number(4) == pytest.approx(25.0 / 12.0, abs=1e-15)
    assert harmonic_number(7) == pytest.approx(363.0 / 140.0, abs=1e-15)


def test_bonbon_beta_n8() -> None:
    beta = bonbon_beta(8)
    assert beta == pytest.approx(0.0275482, abs=1e-7)
    assert beta == pytest.approx(1.0 / (2 * 7 * 363.0 / 140.0), rel=1e-14)
    assert 1.0 / (2.0 * beta) == pytest.approx(18.15, rel=1e-3)
    assert 1.0 / (2.0 * beta) == pytest.approx(7 * harmonic_number(7), rel=1e-14)


def test_bonbon_beta_n2() -> None:
    assert bonbon_beta(2) == pytest.approx(0.5)


def test_bonbon_alpha0_equals_ipo_with_beta_star() -> None:
    args = _pairs(3.0, b=5)
    loss = bonbon_loss(*args, n=8, alpha=0.0)
    torch.testing.assert_close(loss, ipo_loss(*args, beta=bonbon_beta(8)))
    torch.testing.assert_close(loss, _full(5, (3.0 - 7 * 363.0 / 140.0) ** 2))


def test_bonbon_alpha1_equals_minus_chosen_logps() -> None:
    args = _pairs(3.0, b=5)
    loss = bonbon_loss(*args, n=8, alpha=1.0)
    torch.testing.assert_close(loss, -args[0])
    torch.testing.assert_close(loss, sft_loss(args[0]))


def test_bonbon_mixture_and_explicit_nll() -> None:
    args = _pairs(1.0, b=3)
    nll = _t(5.0, 6.0, 7.0)
    alpha = 0.25
    loss = bonbon_loss(*args, n=4, alpha=alpha, chosen_nll=nll)
    target = 3 * (1 + 0.5 + 1.0 / 3.0)  # (n-1) H_{n-1} = 5.5
    expected = alpha * nll + (1 - alpha) * (1.0 - target) ** 2
    torch.testing.assert_close(loss, expected)


def test_bonbon_dpo_sigmoid_variant_matches_dpo() -> None:
    args = _pairs(4.0, b=3)
    loss = bonbon_loss(*args, n=8, alpha=0.0, variant="dpo_sigmoid")
    torch.testing.assert_close(loss, dpo_loss(*args, beta=bonbon_beta(8)))
    torch.testing.assert_close(loss, -F.logsigmoid(_full(3, 4.0 * bonbon_beta(8))))
    mixed = bonbon_loss(*args, n=8, alpha=0.5, variant="dpo_sigmoid")
    torch.testing.assert_close(mixed, 0.5 * (-args[0]) + 0.5 * loss)


def test_bonbon_gradient_flows_to_policy() -> None:
    pc, pr, rc, rr = _pairs(0.0)
    pc = pc.clone().requires_grad_(True)
    bonbon_loss(pc, pr, rc, rr, n=8, alpha=0.5).sum().backward()
    # SFT term: -1 * 0.5 ; IPO term: 0.5 * 2 * (0 - 18.15) ; both push chosen up
    expected = -0.5 + 0.5 * 2.0 * (0.0 - 7 * 363.0 / 140.0)
    torch.testing.assert_close(pc.grad, _full(3, expected))


# ------------------------------------------------------------------------------------- SFT/BOND


def test_sft_loss() -> None:
    torch.testing.assert_close(sft_loss(_t(-3.0, -0.5)), _t(3.0, 0.5))


def test_bond_loss_mix() -> None:
    fwd, bwd = _t(1.0, 2.0), _t(3.0, 10.0)
    torch.testing.assert_close(bond_loss(fwd, bwd, 0.0), fwd)
    torch.testing.assert_close(bond_loss(fwd, bwd, 1.0), bwd)
    torch.testing.assert_close(bond_loss(fwd, bwd, 0.25), _t(1.5, 4.0))


# ------------------------------------------------------------------------------------- BT


def test_bradley_terry_hand_values() -> None:
    sw, sl = _t(1.0, 0.0, -2.0), _t(0.0, 0.0, 1.0)
    loss = bradley_terry_loss(sw, sl)
    expected = _t(math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(3.0)))
    torch.testing.assert_close(loss, expected)
    centered = bradley_terry_loss(sw, sl, center_coef=0.001)
    torch.testing.assert_close(centered, expected + 0.001 * 0.5 * _t(1.0, 0.0, 5.0))


def test_bradley_terry_gradient_sign() -> None:
    sw = _t(0.2).requires_grad_(True)
    sl = _t(0.1).requires_grad_(True)
    bradley_terry_loss(sw, sl).sum().backward()
    assert sw.grad.item() < 0 < sl.grad.item()


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_dpo_ipo_reject_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*_pairs(0.0), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*_pairs(0.0), beta=beta)


def test_dpo_rejects_bad_label_smoothing() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_pairs(0.0), beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_pairs(0.0), beta=0.1, label_smoothing=-0.1)


def test_shape_mismatch_names_argument() -> None:
    pc, pr, rc, rr = _pairs(0.0, b=3)
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        dpo_loss(pc, pr, rc, rr[:2], beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        ipo_loss(pc, pr[:1], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="chosen_nll"):
        bonbon_loss(pc, pr, rc, rr, n=4, alpha=0.5, chosen_nll=_t(1.0))
    with pytest.raises(ValueError, match="rejected_scores"):
        bradley_terry_loss(_t(1.0, 2.0), _t(1.0))
    with pytest.raises(ValueError, match="backward_loss"):
        bond_loss(_t(1.0, 2.0), _t(1.0), 0.5)


@pytest.mark.parametrize("alpha", [-0.01, 1.01])
def test_bonbon_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        bonbon_loss(*_pairs(0.0), n=8, alpha=alpha)


@pytest.mark.parametrize("n", [1, 0, -3, 2.5])
def test_bonbon_rejects_bad_n(n: int) -> None:
    with pytest.raises(ValueError, match="n must"):
        bonbon_beta(n)
    with pytest.raises(ValueError, match="n must"):
        bonbon_loss(*_pairs(0.0), n=n, alpha=0.5)


def test_misc_validation() -> None:
    with pytest.raises(ValueError, match="variant"):
        bonbon_loss(*_pairs(0.0), n=8, alpha=0.5, variant="sigmoid")
    with pytest.raises(ValueError, match="m must"):
        harmonic_number(-1)
    with pytest.raises(ValueError, match="w must"):
        bond_loss(_t(1.0), _t(1.0), 1.5)
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(_t(1.0), _t(1.0), center_coef=-1.0)
