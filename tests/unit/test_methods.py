import numpy as np
import pytest

from pipeline_lib.math.cdf import CurveFit, empirical_cdf
from pipeline_lib.math.vbon import log_bon_ratio, vbon_rewards
from pipeline_lib.settings.methods import MethodRun, kl_coefficient, run_name


def test_run_names_and_kl_coefficients():
    assert run_name({"method": "vbon", "n": 8, "bound": "exact"}) == "vbon-n8-exact"
    assert run_name({"method": "bonbon", "n": 8}) == "bonbon-n8"
    assert run_name({"method": "dpo", "n": 8, "beta": 0.1}) == "dpo-n8-b0.1"
    assert run_name({"method": "ppo", "beta": 0.05, "name": "mine"}) == "mine"
    assert run_name({"method": "ppo", "beta": 0}) == "ppo-b0"
    assert run_name({"method": "vbon", "n": 8, "bound": "exact"}, ("n",), seed=1) == (
        "vbon-n8-exact-s1")
    assert run_name({"method": "ppo", "beta": 0.05, "name": "mine"}, ("beta",)) == "mine-b0.05"
    assert run_name({"method": "ppo", "beta": 0.01, "objective": "wco"}) == "ppo-b0.01-wco"
    assert kl_coefficient(MethodRun(name="v", method="vbon", n=8)) == pytest.approx(1 / 7)
    assert kl_coefficient(MethodRun(name="p", method="ppo", beta=0.05)) == 0.05
    assert kl_coefficient(MethodRun(name="p", method="ppo", beta=0)) == 0.0
    assert MethodRun(name="p", method="ppo", beta=0.05).sweep == "p"  # built by hand


def test_vbon_l1_is_log_smoothed_cdf_and_monotone():
    row = np.sort(np.random.default_rng(0).normal(size=16))
    q = np.linspace(-3, 3, 50)
    r = vbon_rewards(np.tile(row, (50, 1)), q, n=8, bound="l1")
    np.testing.assert_allclose(r, np.log(empirical_cdf(row, q)))
    assert np.all(np.diff(r) >= 0)


def test_vbon_exact_counts_the_fresh_sample_once():
    row = np.array([0.0, 1.0, 1.0, 2.0])  # M = 4
    n = 3
    # r = 1.0 ties two cached rewards: F- = 1/5, F = (3 + 1)/5
    got = vbon_rewards(row[None, :], np.array([1.0]), n, "exact")
    expected = log_bon_ratio(np.array([0.2]), np.array([0.8]), n) / (n - 1)
    np.testing.assert_allclose(got, expected)
    # below every cached reward: finite; above all: F- = 4/5, F = 1
    low, high = vbon_rewards(np.tile(row, (2, 1)), np.array([-5.0, 9.0]), n, "exact")
    assert np.isfinite(low) and low < high
    assert high == pytest.approx(np.log((1 - 0.8**3) / 0.2) / (n - 1))
    assert low == pytest.approx(np.log(0.2**3 / 0.2) / (n - 1))  # F- = 0, F = 1/5
    # monotone in the reward
    q = np.linspace(-1, 3, 41)
    r = vbon_rewards(np.tile(row, (41, 1)), q, n, "exact")
    assert np.all(np.diff(r) >= -1e-12)
    # the vBoN code's 1/n scale
    np.testing.assert_allclose(vbon_rewards(row[None, :], np.array([1.0]), n, "exact", "n"),
                               expected * (n - 1) / n)


def test_vbon_l1_curvefit_clipped_to_the_cdf_floor():
    row = np.arange(9.0)
    fit = CurveFit(a=1.0, b=1.0, c=0.0, rmse=0.0, ok=True)
    r = vbon_rewards(np.tile(row, (3, 1)), np.array([-50.0, 0.0, 50.0]), 8, "l1",
                     fits=[fit, fit, None])
    assert r[0] == pytest.approx(-np.log(10))  # floor log 1/(M+1)
    assert r[1] == pytest.approx(-1.0)  # -a exp(-b * 0) - c
    assert r[2] == pytest.approx(0.0)  # no fit: empirical F = 1
    with pytest.raises(ValueError, match="bound"):
        vbon_rewards(row[None, :], np.array([1.0]), 8, "l2")
