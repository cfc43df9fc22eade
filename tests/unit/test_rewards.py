import numpy as np
import pytest

from pipeline_lib.math.ensembles import ensemble, member_stats, zscore_members

R = np.array([[1.0, 2.0, -1.0], [3.0, 2.0, 0.0], [2.0, 5.0, 1.0]])  # k=3 members, N=3


def test_mean_wco_uwo_hand_computed():
    np.testing.assert_allclose(ensemble(R, "mean"), [2.0, 3.0, 0.0])
    np.testing.assert_allclose(ensemble(R, "wco"), [1.0, 2.0, -1.0])
    # population variances: [2/3, 2, 2/3]
    np.testing.assert_allclose(ensemble(R, "uwo", uwo_lambda=0.5), [2 - 1 / 3, 3 - 1, -1 / 3])
    np.testing.assert_allclose(ensemble(R, "uwo", uwo_lambda=0.0), ensemble(R, "mean"))


def test_single_member_is_identity():
    r = np.array([[0.3, -2.0, 7.0]])
    for obj in ("mean", "wco", "uwo"):
        np.testing.assert_allclose(ensemble(r, obj), r[0])


def test_wco_le_mean_and_uwo_le_mean():
    r = np.random.default_rng(0).normal(size=(4, 100))
    assert np.all(ensemble(r, "wco") <= ensemble(r, "mean"))
    assert np.all(ensemble(r, "uwo", uwo_lambda=1.0) <= ensemble(r, "mean") + 1e-12)


def test_errors():
    with pytest.raises(ValueError, match="unknown ensemble objective 'median'"):
        ensemble(R, "median")
    with pytest.raises(ValueError, match=r"shape \(k, N\)"):
        ensemble(np.ones(3), "mean")
    bad = R.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="member 1, response 2"):
        ensemble(bad, "mean")
    with pytest.raises(ValueError, match="uwo_lambda"):
        ensemble(R, "uwo", uwo_lambda=-1)


def test_zscore_against_reference():
    ref = np.array([[0.0, 2.0, 4.0], [10.0, 10.0, 40.0]])
    mean, std = member_stats(ref)
    z = zscore_members(ref, mean, std)
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1), 1)
    with pytest.raises(ValueError, match="constant reward"):
        member_stats(np.array([[1.0, 1.0], [0.0, 1.0]]))
