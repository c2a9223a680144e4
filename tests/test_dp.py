"""A record's exposure in DP units (ftps.privacy.dp, and its use in ftps.privacy.scoring.score)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, special, stats

from ftps.privacy import dp, scoring
from ftps.privacy.masks import make_masks


def _hockey_stick(mu: float, eps: float) -> float:
    """delta(eps) of N(mu, 1) against N(0, 1) as the integral of (p - e^eps q)_+, computed without
    the closed form the module uses."""
    kink = eps / mu + mu / 2.0  # where p = e^eps q; the integrand is 0 below it
    value, _ = integrate.quad(
        lambda x: stats.norm.pdf(x, mu) - np.exp(eps) * stats.norm.pdf(x), kink, np.inf, epsabs=1e-15)
    return value


# (mu, epsilon at delta = 1e-5): golden values, each checked against the hockey-stick integral below.
GOLDEN = [(0.1, 0.34067), (0.5, 1.99309), (1.0, 4.37718), (2.0, 9.99726), (3.0, 16.67549)]


@pytest.mark.parametrize("mu, eps", GOLDEN)
def test_epsilon_at_delta_golden_values(mu, eps):
    got = float(dp.epsilon_at_delta(mu, 1e-5))
    assert got == pytest.approx(eps, abs=1e-4)
    assert _hockey_stick(mu, got) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_closed_form_matches_the_integral_and_inverts(mu, delta):
    eps = float(dp.epsilon_at_delta(mu, delta))
    if eps == 0.0:  # only when even epsilon = 0 meets delta: 2 Phi(mu/2) - 1 <= delta
        assert 2 * special.ndtr(mu / 2) - 1 <= delta
        return
    assert float(dp.delta_at_epsilon(mu, eps)) == pytest.approx(delta, rel=1e-9)
    assert _hockey_stick(mu, eps) == pytest.approx(delta, rel=1e-6)


def test_edges_and_monotonicity():
    mus = np.array([0.0, 1e-9, 0.2, 1.0, 4.0, np.inf])
    eps = dp.epsilon_at_delta(mus, 1e-5)
    assert eps[0] == 0.0 and eps[1] == 0.0 and eps[-1] == np.inf
    assert np.all(np.diff(eps) >= 0)
    # epsilon = 0 is (0, delta)-DP exactly when TPR - FPR <= delta
    assert float(dp.delta_at_epsilon(1.0, 0.0)) == pytest.approx(2 * special.ndtr(0.5) - 1)
    # a bigger delta buys a smaller epsilon
    assert dp.epsilon_at_delta(1.0, 1e-3) < dp.epsilon_at_delta(1.0, 1e-5) < dp.epsilon_at_delta(1.0, 1e-8)
    assert dp.epsilon_at_delta(np.ones((2, 3)), 1e-5).shape == (2, 3)
    # far out the bracket's top is the answer (no overflow), continuous with the solved root
    near, far = dp.epsilon_at_delta(np.array([999.9, 1000.1]), 1e-5)
    assert far == pytest.approx(near, rel=1e-3) and dp.epsilon_at_delta(1e200, 1e-5) == np.inf


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 2.0])
def test_bad_delta_is_refused(bad):
    with pytest.raises(ValueError, match="delta"):
        dp.epsilon_at_delta(1.0, bad)


def test_mu_interval_is_the_image_of_the_dprime_interval():
    low, high = dp.mu_interval(np.array([-1.0, 0.5, -2.0, 0.0]), np.array([2.0, 1.5, -0.5, 0.0]))
    np.testing.assert_array_equal(low, [0.0, 0.5, 0.5, 0.0])
    np.testing.assert_array_equal(high, [2.0, 1.5, 2.0, 0.0])


def _synthetic(n: int, mu_true: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Statistics whose per-record IN and OUT distributions are N(mu_j, 1) and N(0, 1): record j
    is exactly mu_j-GDP against this (optimal) test. Complementary pair masks as in production."""
    rng = np.random.default_rng(seed)
    member = make_masks(n, mu_true.size, seed=seed)
    phi = rng.standard_normal(member.shape) + member * mu_true
    return phi, member


@pytest.mark.parametrize("n", [16, 64])
def test_intervals_cover_the_true_mu_and_epsilon_at_their_nominal_rate(n):
    m = 3000
    rng = np.random.default_rng(n)
    mu_true = rng.choice([0.0, 0.25, 0.5, 1.0, 2.0], size=m)
    phi, member = _synthetic(n, mu_true, seed=7 + n)
    r = scoring.score(phi, member, delta=1e-5).records
    eps_true = dp.epsilon_at_delta(mu_true, 1e-5)
    covered_mu = (r.empirical_mu_ci_low <= mu_true) & (mu_true <= r.empirical_mu_ci_high)
    covered_eps = (r.empirical_epsilon_ci_low <= eps_true) & (eps_true <= r.empirical_epsilon_ci_high)
    # 95% intervals on 3000 records: the binomial sd of the rate is 0.4%, so 0.92..0.995 is wide
    # enough for sampling error (mu = 0 records are covered whenever d''s interval straddles 0,
    # which is at least 95%) and tight enough to catch a wrong mapping.
    for covered in (covered_mu, covered_eps):
        assert 0.92 <= covered.mean() <= 0.995, covered.mean()
    np.testing.assert_array_equal(covered_mu, covered_eps)  # epsilon is increasing in mu
    assert np.all(r.empirical_mu_ci_low <= r.empirical_mu) and np.all(r.empirical_mu <= r.empirical_mu_ci_high)
    assert np.all(r.empirical_epsilon_ci_low <= r.empirical_epsilon) and np.all(r.empirical_epsilon <= r.empirical_epsilon_ci_high)
    # the point estimate tracks the truth: the mean over the strongly exposed records is close
    strong = mu_true == 2.0
    assert abs(r.empirical_mu[strong].mean() - 2.0) < 0.15


def test_score_reports_mu_as_abs_dprime_and_the_headline_is_its_advantage():
    phi, member = _synthetic(32, np.array([0.0, 0.5, 1.5, -1.0]), seed=3)
    res = scoring.score(phi, member, delta=1e-6)
    r = res.records
    assert res.delta == 1e-6
    dprime = 2 * special.ndtri((r.score + 1) / 2)
    np.testing.assert_allclose(r.empirical_mu, np.abs(dprime), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.empirical_epsilon, dp.epsilon_at_delta(r.empirical_mu, 1e-6))
    assert r.empirical_mu[3] > 0  # IN below OUT is exposure too


def test_score_refuses_a_bad_delta():
    phi, member = _synthetic(8, np.zeros(4), seed=1)
    with pytest.raises(ValueError, match="delta"):
        scoring.score(phi, member, delta=0.0)


def test_degenerate_records_use_the_pooled_spread():
    member = make_masks(8, 3, seed=0)
    phi = np.where(member, 5.0, -5.0)  # no spread: IN and OUT never overlap
    phi[:, 1] = 0.0  # no difference at all
    phi[:, 2] = np.random.default_rng(0).standard_normal(8)  # a normal record: the pooled fits work
    r = scoring.score(phi, member).records
    # a record without spread of its own is measured against the pooled spread (finite, large)
    assert 10 < r.empirical_mu[0] < np.inf and r.empirical_epsilon[0] > r.empirical_epsilon[2]
    assert r.empirical_mu[1] == 0.0 and r.empirical_epsilon[1] == 0.0 and r.empirical_mu_ci_low[1] == 0.0
