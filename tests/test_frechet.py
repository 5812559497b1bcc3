"""Fréchet distance: closed forms and the streaming statistics it is computed from."""

from __future__ import annotations

import numpy as np
import pytest

from apt.eval.frechet import FeatureStats, frechet_distance, stats_distance


def test_set_to_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 8)) @ np.random.default_rng(1).normal(size=(8, 8))
    s = FeatureStats.from_features(feats)
    assert abs(stats_distance(s, s)) < 1e-8


def test_diagonal_gaussians_closed_form():
    # d^2 = ||mu_a - mu_b||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances.
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_full_covariance_commuting_closed_form():
    # Same eigenbasis Q: Tr(S_a + S_b - 2 (S_a S_b)^1/2) = sum (sqrt(l_a) - sqrt(l_b))^2.
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    la, lb = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    Sa, Sb = Q @ np.diag(la) @ Q.T, Q @ np.diag(lb) @ Q.T
    mu = rng.normal(size=5)
    got = frechet_distance(mu, Sa, mu + 1.0, Sb)
    assert got == pytest.approx(5.0 + np.sum((np.sqrt(la) - np.sqrt(lb)) ** 2), rel=1e-9)


def test_streaming_stats_match_numpy_and_batching():
    feats = np.random.default_rng(2).normal(size=(257, 7))
    one = FeatureStats.from_features(feats)
    many = FeatureStats(dim=7)
    for i in range(0, 257, 10):
        many.update(feats[i : i + 10])
    np.testing.assert_allclose(one.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(many.sigma, one.sigma, rtol=1e-10, atol=1e-12)
    assert one.sum_DD.dtype == np.float64


def test_stats_roundtrip(tmp_path):
    s = FeatureStats.from_features(np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32))
    s.save(str(tmp_path / "s.npz"))
    t = FeatureStats.load(str(tmp_path / "s.npz"))
    assert t.n == 20 and t.sum_DD.dtype == np.float64
    np.testing.assert_array_equal(t.sigma, s.sigma)


def test_works_with_a_scipy_whose_sqrtm_has_no_disp(monkeypatch):
    """scipy 1.18 removed sqrtm's `disp` argument (the H100 machine's scipy); the distance must not pass it."""
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda A: real_sqrtm(A))
    sa, sb = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    d = frechet_distance(np.zeros(2), sa, np.ones(2), sb)
    assert d == pytest.approx(2.0 + 5.0 + 10.0 - 2.0 * (3.0 + 2.0))
