"""Tests of the pure scoring maths (ftps.privacy.scoring): golden values computed by
hand, a naive loop reference for the vectorised leave-one-model-out fits, and hypothesis
properties."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ftps.privacy import plots
from ftps.privacy.masks import make_masks
from ftps.privacy.scoring import (
    DEFAULT_METHOD,
    HEADLINE,
    METHODS,
    fit_offline_gaussian,
    newcombe_interval,
    online_threshold,
    per_record_auc,
    roc_curve,
    score,
    wilson_interval,
)

GLOBAL = {"offline_mu": 0.0, "offline_sigma": 1.0}


def _kw(method: str, **extra) -> dict:
    return {"method": method, **(GLOBAL if method == "offline-global" else {}), **extra}


def _batch(n: int, m: int, *, seed: int, effect: float | np.ndarray = 1.0, offsets=2.0):
    """Balanced masks and a statistic with per-record offsets and IN shift ``effect``."""
    rng = np.random.default_rng(seed)
    member = make_masks(n, m, seed=seed)
    phi = rng.normal(size=(n, m)) + member * effect + rng.normal(0, offsets, m)
    return phi, member


# ---------------------------------------------------------------------------------------------
# make_masks
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_pairs=st.integers(2, 40), m=st.integers(1, 101), seed=st.integers(0, 2**32 - 1)
)
def test_make_masks_balance(n_pairs, m, seed):
    n = 2 * n_pairs
    masks = make_masks(n, m, seed=seed)
    assert masks.shape == (n, m) and masks.dtype == bool
    # complementary pairs
    assert np.all(masks[0::2] ^ masks[1::2])
    # every record IN for exactly n/2 models
    assert np.all(masks.sum(axis=0) == n // 2)
    # every model gets floor(m/2) or ceil(m/2) records, and the extra record alternates
    sizes = masks.sum(axis=1)
    assert set(sizes.tolist()) <= {m // 2, (m + 1) // 2}
    if m % 2:
        assert int(np.sum(sizes == (m + 1) // 2)) == n // 2
    np.testing.assert_array_equal(masks, make_masks(n, m, seed=seed))  # deterministic


def test_make_masks_differs_by_seed_and_pair():
    a, b = make_masks(8, 50, seed=1), make_masks(8, 50, seed=2)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a[0], a[2])


@pytest.mark.parametrize("n", [0, 2, 3, 5, 7, -4])
def test_make_masks_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n_models must be even and >= 4"):
        make_masks(n, 10, seed=0)


@pytest.mark.parametrize("args", [(4, 0), (4.0, 10), (True, 10), (4, 2.5)])
def test_make_masks_rejects_bad_args(args):
    with pytest.raises(ValueError):
        make_masks(*args, seed=0)


# ---------------------------------------------------------------------------------------------
# fit_offline_gaussian
# ---------------------------------------------------------------------------------------------


def test_fit_offline_gaussian_golden():
    # mean 2.5; squared deviations 2.25+0.25+0.25+2.25 = 5, / (4-1) -> std sqrt(5/3)
    mu, sigma = fit_offline_gaussian(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert mu == pytest.approx(2.5)
    assert sigma == pytest.approx(np.sqrt(5.0 / 3.0))
    assert isinstance(mu, float) and isinstance(sigma, float)


@pytest.mark.parametrize(
    "values, match",
    [
        ([1.0], "at least 2"),
        ([], "at least 2"),
        ([1.0, np.nan], "non-finite"),
        ([1.0, np.inf], "non-finite"),
        ([3.0, 3.0, 3.0], "zero variance"),
        (np.array([True, False]), "real numeric"),
    ],
)
def test_fit_offline_gaussian_rejects(values, match):
    with pytest.raises(ValueError, match=match):
        fit_offline_gaussian(np.asarray(values))


# ---------------------------------------------------------------------------------------------
# Small statistics helpers
# ---------------------------------------------------------------------------------------------


def test_wilson_and_newcombe_published_values():
    # Newcombe (1998) Stat. Med. 17:857 example 81/263 -> 0.2553, 0.3662 (Wilson score)
    lo, hi = wilson_interval(81, 263)
    np.testing.assert_allclose([lo, hi], [0.2553, 0.3662], atol=5e-5)
    # Newcombe (1998) Stat. Med. 17:873, method 10, example 56/70 - 48/80 -> 0.0524, 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80)
    np.testing.assert_allclose([lo, hi], [0.0524, 0.3339], atol=5e-5)


def test_newcombe_by_hand_and_bounds():
    # 1/2 - 0/2, z = 1.959964: Wilson(1/2) = 0.5 -+ 0.405470; Wilson(0/2) = (0, 0.657620)
    # low = 0.5 - sqrt(0.405470^2 + 0.657620^2), high = 0.5 + sqrt(0.405470^2 + 0)
    lo, hi = newcombe_interval(1, 2, 0, 2)
    np.testing.assert_allclose([lo, hi], [-0.272573, 0.905469], atol=2e-6)
    k1, n1, k2, n2 = np.array([0, 5, 5, 0]), 5, np.array([5, 0, 5, 0]), 5
    lo, hi = newcombe_interval(k1, n1, k2, n2)
    d = k1 / n1 - k2 / n2
    assert np.all((-1 <= lo) & (lo <= d) & (d <= hi) & (hi <= 1))
    assert np.all(hi - lo > 0)


def test_roc_curve_golden():
    fpr, tpr = roc_curve(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 0, 1, 0], dtype=bool))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    # ties form one point (and inf is a statistic like any other)
    fpr, tpr = roc_curve(np.array([np.inf, np.inf, 0.0, 0.0]), np.array([1, 0, 1, 0], bool))
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1])


def test_per_record_auc_golden_with_ties():
    phi = np.array([[3.0, 2.0], [0.0, 0.0], [2.0, 0.0], [1.0, -1.0]])
    member = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=bool)
    # record 0: IN {3,2} vs OUT {0,1}: 4/4.
    # record 1: IN {0,-1} vs OUT {2,0}: the only non-loss is the 0 = 0 tie -> 0.5/4
    np.testing.assert_allclose(per_record_auc(phi, member), [1.0, 0.125])


def test_online_threshold():
    assert online_threshold(5.0, 1.0, 1.0, 1.0) == pytest.approx([3.0])  # equal variances: midpoint
    roots = online_threshold(2.0, 2.0, 0.0, 1.0)
    for x in roots:
        llr = stats.norm.logpdf(x, 2.0, 2.0) - stats.norm.logpdf(x, 0.0, 1.0)
        assert llr == pytest.approx(0.0, abs=1e-9)
    assert len(roots) == 2


# ---------------------------------------------------------------------------------------------
# score(): golden values by hand
# ---------------------------------------------------------------------------------------------


def test_offline_global_golden():
    phi = np.array([[3.0, 0.0], [0.0, 2.0], [2.0, 0.5], [1.0, -1.0]])
    member = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])  # 0/1 ints accepted
    r = score(phi, member, method="offline-global", offline_mu=0.0, offline_sigma=1.0)
    # member iff 1 - Phi(phi) < 0.05 iff phi > 1.6449
    np.testing.assert_array_equal(r.decisions, phi > 1.6449)
    np.testing.assert_allclose(r.test_stat, phi)
    # record 0: TPR 2/2, FPR 0/2 -> 1; record 1: TPR 1/2 (2 yes, -1 no), FPR 0/2 -> 0.5
    np.testing.assert_allclose(r.records.counted_p, [1.0, 0.5])
    np.testing.assert_array_equal(r.records.n_in, [2, 2])
    np.testing.assert_array_equal(r.records.n_out, [2, 2])
    np.testing.assert_allclose(r.records.auc, [1.0, 0.5])
    np.testing.assert_allclose(r.records.counted_p_ci_low[1], -0.272573, atol=2e-6)
    np.testing.assert_allclose(r.records.counted_p_ci_high[1], 0.905469, atol=2e-6)
    # batch ROC over 8 pairs: stats IN {3,2,2,-1}, OUT {0,1,0,0.5}: AUC = (4+4+4+0)/16
    assert r.batch.auc == pytest.approx(0.75)
    assert r.batch.tpr_at_1pct_fpr == pytest.approx(0.75)
    # mu, sigma shifted: phi=2 gives z=(2-1)/0.5=2 -> member; phi=1 gives z=0 -> not
    r2 = score(phi, member, method="offline-global", offline_mu=1.0, offline_sigma=0.5)
    np.testing.assert_allclose(r2.test_stat, (phi - 1.0) / 0.5)


# n=6 models, one record, IN = models 0..2 with phi 4,5,6; OUT = models 3..5 with phi 0,1,2.
PHI6 = np.array([[4.0], [5.0], [6.0], [0.0], [1.0], [2.0]])
MEM6 = np.array([[1], [1], [1], [0], [0], [0]], dtype=bool)


def test_online_fixed_variance_golden():
    # Pooled residual variance: residuals -1,0,1 | -1,0,1 -> M2 = 4 over 6-2 = 4 dof -> 1.
    # Leaving model 0 (x=4, IN mean 5) out: M2 = 4 - 3/2*1 = 2.5 over 3 dof; IN mean -> 5.5.
    # LLR = ((x - mu_out)^2 - (x - mu_in)^2) / (2 var) = (9 - 2.25) / (2*2.5/3) = 4.05.
    # Model 1 (x=5): M2 = 4 over 3 dof, IN mean 5: (16 - 0) / (8/3) = 6.
    # Model 2 (x=6): var 2.5/3, IN mean 4.5: (25 - 2.25) / (5/3) = 13.65. OUT models mirror.
    r = score(PHI6, MEM6, method="online-per-record", fixed_variance=True)
    np.testing.assert_allclose(r.test_stat[:, 0], [4.05, 6.0, 13.65, -13.65, -6.0, -4.05])
    np.testing.assert_allclose(r.records.counted_p, [1.0])
    np.testing.assert_allclose(r.records.sigma_in, [1.0])
    np.testing.assert_allclose(r.records.sigma_out, [1.0])
    # d' = (5 - 1) / 1 = 4 -> 2 Phi(2) - 1
    np.testing.assert_allclose(r.records.score, [0.9544997361036416])
    np.testing.assert_allclose(r.records.mu_in, [5.0])
    np.testing.assert_allclose(r.records.mu_out, [1.0])


def test_online_per_record_variance_golden():
    # Model 0 (x=4, IN): IN fit without it {5,6}: mean 5.5, std 0.70711; OUT {0,1,2}: mean 1,
    # std 1. LLR = (-0.5*(1.5/0.70711)^2 - log 0.70711) - (-0.5*9) = -2.25 + 0.34657 + 4.5.
    # Model 1 (x=5): IN {4,6}: mean 5, std 1.41421: -log 1.41421 + 0.5*16 = 7.65343.
    r = score(PHI6, MEM6, method="online-per-record", moderated=False)
    np.testing.assert_allclose(r.test_stat[:2, 0], [2.596574, 7.653426], atol=1e-6)
    np.testing.assert_allclose(r.test_stat[3:, 0], -r.test_stat[2::-1, 0])  # mirror image
    np.testing.assert_allclose(r.records.counted_p, [1.0])


def test_offline_per_record_golden():
    # IN models: OUT fit on all OUT {0,1,2}: mean 1, std 1 -> z = 3, 4, 5 (all members).
    # OUT model 3 (x=0): fit {1,2}: mean 1.5, std 0.70711 -> z = -2.12132
    # OUT model 4 (x=1): fit {0,2}: mean 1, std 1.41421 -> z = 0
    # OUT model 5 (x=2): fit {0,1}: mean 0.5, std 0.70711 -> z = 2.12132, p = 0.017 < 0.05:
    # a false positive, so perfectly separated IN/OUT scores TPR - FPR = 1 - 1/3.
    r = score(PHI6, MEM6, method="offline-per-record", moderated=False)
    np.testing.assert_allclose(
        r.test_stat[:, 0], [3.0, 4.0, 5.0, -2.1213203, 0.0, 2.1213203], atol=1e-7
    )
    np.testing.assert_array_equal(r.decisions[:, 0], [1, 1, 1, 0, 0, 1])
    np.testing.assert_allclose(r.records.counted_p, [2.0 / 3.0])
    # with alpha = 0.01 the z = 2.12 model is no longer called (p = 0.017 > 0.01)
    r = score(PHI6, MEM6, method="offline-per-record", alpha=0.01)
    np.testing.assert_allclose(r.records.counted_p, [1.0])


def test_rmia_golden():
    # n=4 models, m=3 records; model 0 and 1 complementary, 2 and 3 complementary.
    member = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=bool)
    phi = np.zeros((4, 3))
    phi[0, 0] = 3.0  # model 0 fits record 0 (IN) much better than the reference
    r = score(phi, member, method="rmia", alpha=0.4)
    # Pr(x|theta) = sigmoid(phi) = 0.5 everywhere except sigmoid(3) for (0, 0); the reference
    # for each (i, j) is the mean over j's OUT models other than i, all 0.5 -> ratio 1, except
    # (0, 0): 2*sigmoid(3) = 1.905. Model 0's population for record 0 = its OUT records {1, 2},
    # ratios 1, 1 -> record 0 beats both: test_stat 1, p = (1 + 0) / 3 = 1/3 < 0.4 -> member.
    assert r.test_stat[0, 0] == pytest.approx(1.0)
    # (0, 1): target ratio 1 vs population {record 2} ratio 1 -> tie -> 0.5; p = (1+1)/2 = 1.
    assert r.test_stat[0, 1] == pytest.approx(0.5)
    assert r.decisions.sum() == 1 and r.decisions[0, 0]
    # record 0: TPR 1/2 (models 0, 2 IN; only model 0 called), FPR 0/2 -> 0.5
    np.testing.assert_allclose(r.records.counted_p, [0.5, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# score(): naive loop reference for the vectorised leave-one-model-out maths
# ---------------------------------------------------------------------------------------------


def _reference(phi, member, method, fixed_variance=False, alpha=0.05):
    """Straight from the definitions, one (model, record) at a time."""
    n, m = phi.shape
    stat = np.empty((n, m))
    dec = np.empty((n, m), dtype=bool)

    def pooled_var(i, groups):  # residual variance over records, model i left out
        ss, dof = 0.0, 0
        for j in range(m):
            for g in groups:
                sel = [k for k in range(n) if member[k, j] == g and k != i]
                v = phi[sel, j]
                ss += np.sum((v - v.mean()) ** 2)
                dof += len(v) - 1
        return ss / dof

    for i in range(n):
        for j in range(m):
            ins = [k for k in range(n) if member[k, j] and k != i]
            outs = [k for k in range(n) if not member[k, j] and k != i]
            x = phi[i, j]
            if method == "offline-per-record":
                sd = (
                    np.sqrt(pooled_var(i, [False]))
                    if fixed_variance
                    else np.std(phi[outs, j], ddof=1)
                )
                stat[i, j] = (x - phi[outs, j].mean()) / sd
                dec[i, j] = stats.norm.sf(stat[i, j]) < alpha
            elif method == "online-per-record":
                if fixed_variance:
                    s_in = s_out = np.sqrt(pooled_var(i, [True, False]))
                else:
                    s_in, s_out = np.std(phi[ins, j], ddof=1), np.std(phi[outs, j], ddof=1)
                stat[i, j] = stats.norm.logpdf(x, phi[ins, j].mean(), s_in) - stats.norm.logpdf(
                    x, phi[outs, j].mean(), s_out
                )
                dec[i, j] = stat[i, j] > 0
            elif method == "rmia":

                def ratio(jj, i=i):
                    refs = [k for k in range(n) if not member[k, jj] and k != i]
                    p_ref = np.mean(1 / (1 + np.exp(-phi[refs, jj])))
                    return (1 / (1 + np.exp(-phi[i, jj]))) / p_ref

                rx = ratio(j)
                pop = [ratio(z) for z in range(m) if z != j and not member[i, z]]
                wins = [1.0 if rx > rz else 0.5 if rx == rz else 0.0 for rz in pop]
                stat[i, j] = np.mean(wins) if pop else 0.5  # no population: uninformative
                p = (1 + sum(rz >= rx for rz in pop)) / (1 + len(pop))
                dec[i, j] = p < alpha
    return stat, dec


@pytest.mark.parametrize(
    "method, fixed",
    [
        ("offline-per-record", False),
        ("offline-per-record", True),
        ("online-per-record", False),
        ("online-per-record", True),
        ("rmia", False),
    ],
)
def test_matches_loop_reference_on_unbalanced_masks(method, fixed):
    rng = np.random.default_rng(7)
    n, m = 9, 7
    # users' own random splits: not balanced, n odd, every record >= 3 IN and >= 3 OUT
    member = np.zeros((n, m), dtype=bool)
    for j in range(m):
        member[rng.choice(n, size=rng.integers(3, n - 2), replace=False), j] = True
    phi = rng.normal(size=(n, m)) * rng.uniform(0.5, 2, m) + member * 0.8
    r = score(phi, member, method=method, fixed_variance=fixed, alpha=0.3, moderated=False)
    stat, dec = _reference(phi, member, method, fixed, alpha=0.3)
    np.testing.assert_allclose(r.test_stat, stat, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(r.decisions, dec)
    n_in = member.sum(0)
    tpr = (dec & member).sum(0) / n_in
    fpr = (dec & ~member).sum(0) / (n - n_in)
    np.testing.assert_allclose(r.records.counted_p, tpr - fpr)
    np.testing.assert_array_equal(r.records.n_in, n_in)
    np.testing.assert_array_equal(r.records.n_out, n - n_in)
    lo, hi = newcombe_interval((dec & member).sum(0), n_in, (dec & ~member).sum(0), n - n_in)
    if method == "rmia":
        np.testing.assert_allclose(r.records.counted_p_ci_low, lo)
        np.testing.assert_allclose(r.records.counted_p_ci_high, hi)
    else:  # Newcombe widened by the jackknife, never narrowed
        assert np.all(r.records.counted_p_ci_low <= lo + 1e-12) and np.all(hi - 1e-12 <= r.records.counted_p_ci_high)


def test_balanced_score_equals_agreement_formula():
    # DESIGN.md: with balanced masks P = 2 * mean_i[LiRA == G] - 1
    phi, member = _batch(16, 40, seed=3)
    for method in METHODS:
        r = score(phi, member, **_kw(method))
        agreement = np.mean(r.decisions == member, axis=0)
        np.testing.assert_allclose(r.records.counted_p, 2 * agreement - 1, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def _assert_same_records(a, b, perm=None):
    for name in a.records.__dataclass_fields__:
        x, y = getattr(a.records, name), getattr(b.records, name)
        if perm is not None:
            x = x[perm]
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, err_msg=name)


_shapes = st.tuples(st.integers(2, 10), st.integers(2, 25), st.integers(0, 10_000))


@settings(max_examples=25, deadline=None)
@given(shape=_shapes, method=st.sampled_from(METHODS), fixed=st.booleans(), data=st.data())
def test_permuting_models_permutes_results(shape, method, fixed, data):
    n_pairs, m, seed = shape
    phi, member = _batch(2 * n_pairs, m, seed=seed)
    perm = np.array(data.draw(st.permutations(range(2 * n_pairs))))
    a = score(phi, member, **_kw(method, fixed_variance=fixed))
    b = score(phi[perm], member[perm], **_kw(method, fixed_variance=fixed))
    _assert_same_records(a, b)
    np.testing.assert_allclose(a.test_stat[perm], b.test_stat, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.decisions[perm], b.decisions)
    assert a.batch.auc == pytest.approx(b.batch.auc, abs=1e-12)
    assert a.warnings == b.warnings


@settings(max_examples=25, deadline=None)
@given(shape=_shapes, method=st.sampled_from(METHODS), fixed=st.booleans(), data=st.data())
def test_record_order_does_not_matter(shape, method, fixed, data):
    n_pairs, m, seed = shape
    phi, member = _batch(2 * n_pairs, m, seed=seed)
    perm = np.array(data.draw(st.permutations(range(m))))
    a = score(phi, member, **_kw(method, fixed_variance=fixed))
    b = score(phi[:, perm], member[:, perm], **_kw(method, fixed_variance=fixed))
    _assert_same_records(a, b, perm)
    np.testing.assert_allclose(a.test_stat[:, perm], b.test_stat, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.decisions[:, perm], b.decisions)
    assert a.batch.auc == pytest.approx(b.batch.auc, abs=1e-12)
    assert a.batch.tpr_at_1pct_fpr == pytest.approx(b.batch.tpr_at_1pct_fpr, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n_pairs=st.integers(2, 16),
    m=st.integers(1, 20),
    seed=st.integers(0, 10_000),
    gap=st.floats(50.0, 1e3),
    fixed=st.booleans(),
)
def test_perfectly_separated_online_scores_one(n_pairs, m, seed, gap, fixed):
    # IN statistics far above OUT ones (gap >> within-group spread 1): every decision right.
    # With per-record variances that needs enough models: at n=6 a leave-one-out IN fit has two
    # values, whose std can be ~0.01, and then an IN value 1 away looks OUT (found by hypothesis;
    # the reason fixed_variance exists). So per-record variances are checked from n=16.
    if not fixed:
        n_pairs = max(n_pairs, 8)
    phi, member = _batch(2 * n_pairs, m, seed=seed, effect=gap, offsets=5.0)
    r = score(phi, member, method="online-per-record", fixed_variance=fixed)
    np.testing.assert_array_equal(r.records.counted_p, 1.0)
    np.testing.assert_array_equal(r.records.auc, 1.0)
    assert r.batch.auc == pytest.approx(1.0) and r.batch.tpr_at_0_1pct_fpr == 1.0
    np.testing.assert_array_less(0.99, r.records.score)
    assert np.all(r.records.counted_p_ci_high == 1.0) and np.all(r.records.counted_p_ci_low > 0)


@pytest.mark.parametrize("method", ["offline-per-record", "rmia"])
def test_perfectly_separated_threshold_methods_catch_every_member(method):
    # One-sided tests at level alpha still call about alpha of the OUT models members, so the
    # score is TPR - FPR = 1 - ~alpha, not 1 (see test_offline_per_record_golden); every IN
    # model is caught and the per-record AUC is 1.
    n, m = 32, 60
    rng = np.random.default_rng(5)
    member = make_masks(n, m, seed=5)
    phi = rng.normal(0, 0.3, (n, m)) + np.where(member, 2.0, -2.0)
    r = score(phi, member, method=method)
    tpr = (r.decisions & member).sum(0) / r.records.n_in
    np.testing.assert_array_equal(tpr, 1.0)
    np.testing.assert_array_equal(r.records.auc, 1.0)
    assert 0.85 < r.records.counted_p.mean() < 1.0
    if method == "offline-per-record":
        assert r.batch.auc == pytest.approx(1.0)
    # rmia's statistic is a rank among the model's ~m/2 population records, so it saturates at 1
    # for members and for the ~1/(m/2) of non-members that beat the whole population: ties at the
    # top keep its batch AUC just below 1 at this small m.


def _null_batch(n=32, m=1500, seed=11):
    # statistic independent of membership, with heterogeneous per-record offsets and spreads
    rng = np.random.default_rng(seed)
    member = make_masks(n, m, seed=seed)
    phi = rng.normal(size=(n, m)) * rng.uniform(0.5, 2, m) + rng.normal(0, 3, m)
    return phi, member


@pytest.mark.parametrize("method", ["offline-global", "offline-per-record", "rmia"])
def test_independent_statistic_scores_centred_on_zero_with_nominal_coverage(method):
    phi, member = _null_batch()
    kw = {"offline_mu": float(phi.mean()), "offline_sigma": float(phi.std())}
    r = score(phi, member, method=method, **(kw if method == "offline-global" else {}))
    p = r.records.counted_p
    assert abs(p.mean()) < 3 * p.std() / np.sqrt(p.size) + 0.005
    assert abs(r.records.auc.mean() - 0.5) < 0.01
    assert abs(r.records.score.mean()) < 0.02
    assert abs(r.batch.auc - 0.5) < 0.02
    covered = np.mean((r.records.counted_p_ci_low <= 0) & (0 <= r.records.counted_p_ci_high))
    # Newcombe's interval is conservative for rare events (decision rates ~ alpha here).
    assert 0.93 <= covered <= 1.0


def test_independent_statistic_online_scores_centred_on_zero():
    phi, member = _null_batch()
    for fixed in (False, True):
        p = score(phi, member, method="online-per-record", fixed_variance=fixed).records.counted_p
        assert abs(p.mean()) < 3 * p.std() / np.sqrt(p.size) + 0.005


@pytest.mark.parametrize("fixed", [False, True])
def test_independent_statistic_online_interval_nominal_coverage(fixed):
    # Online LiRA's n decisions on a record are not independent (all use Gaussians fitted on the
    # same record's other models): the binomial (Newcombe) interval alone covers 0 for only
    # ~0.86 of records here (0.82 with fixed variance). The jackknife widening restores it.
    phi, member = _null_batch()
    r = score(phi, member, method="online-per-record", fixed_variance=fixed)
    covered = np.mean((r.records.counted_p_ci_low <= 0) & (0 <= r.records.counted_p_ci_high))
    assert 0.94 <= covered <= 0.999
    tp, fp = (r.decisions & member).sum(0), (r.decisions & ~member).sum(0)
    lo, hi = newcombe_interval(tp, r.records.n_in, fp, r.records.n_out)
    assert np.mean((lo <= 0) & (0 <= hi)) < 0.9  # what the widening is for


def _unpaired_masks(n, m, seed):
    """Every record IN for exactly n/2 models, but no two models have complementary masks."""
    rng = np.random.default_rng(seed)
    return rng.permuted(np.broadcast_to(np.arange(n) < n // 2, (m, n)), axis=1).T.copy()


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("fixed", [False, True])
def test_independent_statistic_model_interval_nominal_coverage(paired, n, fixed):
    phi, member = _null_batch(n=n, seed=n + paired)
    if not paired:
        member = _unpaired_masks(n, phi.shape[1], seed=n)
    r = score(phi, member, method="online-per-record", fixed_variance=fixed)
    covered = np.mean((r.records.score_ci_low <= 0) & (0 <= r.records.score_ci_high))
    assert 0.92 <= covered <= 0.985
    assert abs(r.records.score.mean()) < 0.02


def test_model_interval_follows_pair_correlation():
    # Complementary models err together (Fashion-MNIST: residual correlation ~ -0.4), which
    # makes mu_in - mu_out noisier than independent models would: here the pair correlation is
    # -0.64 and Var(gap) is 1.64x what Welch's formula assumes. The paired interval sees it.
    rng = np.random.default_rng(3)
    n, m = 32, 3000
    member = make_masks(n, m, seed=3)
    shared = np.repeat(rng.normal(size=(n // 2, m)), 2, axis=0)  # one draw per pair
    offsets = rng.normal(0, 3, m)
    phi = shared * np.where(member, 0.8, -0.8) + rng.normal(0, 0.6, (n, m)) + offsets

    def coverage(r):
        return np.mean((r.records.score_ci_low <= 0) & (0 <= r.records.score_ci_high))

    assert coverage(score(phi, member)) >= 0.93
    # One extra model (n odd) hides the pairing: Welch's interval is too narrow, as expected.
    extra = score(np.vstack([phi, rng.normal(0, 1, m) + offsets]), np.vstack([member, np.ones(m, bool)]))
    assert coverage(extra) < 0.9


# n=8 models, one record; IN = models 0..3, OUT = models 4..7. With one record every IN mask is
# the complement of every OUT mask; models pair in order of their statistic (the canonical rank):
# OUT 0, 1, 1.5, 2 with IN 3, 4, 5, 8 -> pair differences 3, 3, 3.5, 6.
PHI8 = np.array([[3.0], [5.0], [4.0], [8.0], [0.0], [2.0], [1.0], [1.5]])
MEM8 = np.array([[1]] * 4 + [[0]] * 4, dtype=bool)


def test_model_interval_golden_paired():
    # gap = 5 - 1.125 = 3.875 = mean of the pair differences; their variance (ddof=1) 6.1875/3 =
    # 2.0625, / K=4 -> Var(gap) = 0.515625 on K-1 = 3 degrees of freedom.
    # IN var 14/3, OUT var 2.1875/3 -> pooled var (14 + 2.1875)/6 = 2.697917, d' = 2.359160.
    # Var(d') = 0.515625/2.697917 + d'^2/(2*6) = 0.654923, se 0.809273; t(0.975, 3) = 3.182446.
    # d' -+ t se = -0.216, 4.934 -> 2 Phi(./2) - 1.
    r = score(PHI8, MEM8, method="online-per-record", moderated=False)
    np.testing.assert_allclose(r.records.score, [2 * stats.norm.cdf(2.359160 / 2) - 1], atol=1e-6)
    np.testing.assert_allclose(r.records.score_ci_low, [-0.086126305], atol=1e-7)
    np.testing.assert_allclose(r.records.score_ci_high, [0.986386904], atol=1e-7)


def test_model_interval_golden_welch():
    # 7 models (odd: no pairs): IN {3, 5, 4} var 1, OUT {0, 2, 1, 1.5} var 0.729167.
    # Var(gap) = 1/3 + 0.729167/4 = 0.515625, Welch df = 0.515625^2 / ((1/3)^2/2 + 0.182292^2/3)
    # = 3.990094. Pooled var (2 + 2.1875)/5 = 0.8375, d' = 2.875/0.915150 = 3.141560;
    # Var(d') = 0.515625/0.8375 + d'^2/10 = 1.602612, se 1.265943; t(0.975, 3.990094) = 2.779166.
    r = score(PHI8[[0, 1, 2, 4, 5, 6, 7]], MEM8[[0, 1, 2, 4, 5, 6, 7]], moderated=False)
    np.testing.assert_allclose(r.records.score_ci_low, [-0.149399648], atol=1e-7)
    np.testing.assert_allclose(r.records.score_ci_high, [0.999131268], atol=1e-7)


def test_jackknife_matches_loop_reference():
    # The documented rule, from the public API: 8 groups of whole complementary pairs, pairs in
    # order of their lower-ranked model (rank: the model's sorted statistics, lexicographic);
    # P refitted without each group; Newcombe's half-widths scaled by sqrt(max(1, v_jack / v_N)).
    phi, member = _batch(24, 30, seed=8, effect=0.7)
    for method in ("online-per-record", "offline-per-record"):
        r = score(phi, member, method=method)
        keys = [tuple(np.sort(row)) for row in phi]
        rank = np.empty(24, int)
        rank[sorted(range(24), key=lambda i: keys[i])] = np.arange(24)
        partner = {
            i: next(k for k in range(24) if np.all(member[k] == ~member[i])) for i in range(24)
        }
        pairs = sorted(
            {tuple(sorted((i, partner[i]))) for i in range(24)},
            key=lambda p: min(rank[p[0]], rank[p[1]]),
        )
        ps = []
        for g in np.array_split(np.arange(12), 8):
            drop = [i for k in g for i in pairs[k]]
            keep = np.setdiff1d(np.arange(24), drop)
            ps.append(score(phi[keep], member[keep], method=method).records.counted_p)
        ps = np.array(ps)
        v_jack = 7 / 8 * ((ps - ps.mean(0)) ** 2).sum(0)
        tp, fp = (r.decisions & member).sum(0), (r.decisions & ~member).sum(0)
        lo, hi = newcombe_interval(tp, 12, fp, 12)
        z = stats.norm.isf(0.025)
        f = np.sqrt(np.maximum(1, v_jack / ((hi - lo) / (2 * z)) ** 2))
        p = r.records.counted_p
        np.testing.assert_allclose(r.records.counted_p_ci_low, np.clip(p - (p - lo) * f, -1, 1), atol=1e-12)
        np.testing.assert_allclose(r.records.counted_p_ci_high, np.clip(p + (hi - p) * f, -1, 1), atol=1e-12)
        assert np.any(f > 1), method


def test_jackknife_skips_records_with_too_few_models_with_warning():
    rng = np.random.default_rng(2)
    member = _unpaired_masks(8, 40, seed=2)
    member[:, 0] = [1, 1, 0, 0, 0, 0, 0, 0]  # record 0: 2 IN models, none to spare
    phi = rng.normal(size=(8, 40)) + member
    r = score(phi, member)
    assert any("too few IN or OUT models for the jackknife" in w for w in r.warnings)
    tp, fp = (r.decisions & member).sum(0), (r.decisions & ~member).sum(0)
    lo, hi = newcombe_interval(tp[:1], 2, fp[:1], 6)
    np.testing.assert_allclose([r.records.counted_p_ci_low[0], r.records.counted_p_ci_high[0]], [lo[0], hi[0]])


# ---------------------------------------------------------------------------------------------
# Bad input and fallbacks
# ---------------------------------------------------------------------------------------------


def _ok():
    return _batch(8, 5, seed=1)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p, g: (np.where(np.arange(5) == 2, np.nan, p), g), "non-finite.*record 2"),
        (lambda p, g: (np.where(np.arange(5) == 0, np.inf, p), g), "non-finite"),
        (lambda p, g: (p[:, :4], g), "shape mismatch"),
        (lambda p, g: (p, g[:7]), "shape mismatch"),
        (lambda p, g: (p[0], g[0]), "2-D"),
        (lambda p, g: (p, g.astype(float)), "member must be boolean"),
        (lambda p, g: (p, g.astype(int) * 2), "member must be boolean"),
        (lambda p, g: (p.astype(str), g), "phi must be a real"),
        (lambda p, g: (p > 0, g), "phi must be a real"),
        (lambda p, g: (p[:2], g[:2]), "at least 4 models"),
        (lambda p, g: (p[:, :0], g[:, :0]), "at least 1 record"),
        (lambda p, g: (p, np.arange(8)[:, None] < np.ones((1, 5))), "fewer than 2 IN"),
        (lambda p, g: (p, np.arange(8)[:, None] >= np.ones((1, 5))), "fewer than 2 OUT"),
        (lambda p, g: (np.ones_like(p), g), "zero variance"),
    ],
)
def test_bad_input_raises_naming_the_problem(mutate, match):
    phi, member = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        score(phi, member)


def test_offline_per_record_without_any_out_spread_raises():
    # n=4, m=1: leaving an OUT model out leaves one OUT value, and no other record to pool with.
    phi, member = _batch(4, 1, seed=0)
    with pytest.raises(ValueError, match="zero variance.*too few"):
        score(phi, member, method="offline-per-record", moderated=False)
    assert np.isfinite(score(phi, member, method="online-per-record").records.counted_p).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "lira"}, "unknown method"),
        ({"method": "offline-global"}, "needs offline_mu and offline_sigma"),
        ({"method": "offline-global", "offline_mu": 0.0, "offline_sigma": 0.0}, "offline_sigma"),
        ({"method": "offline-global", "offline_mu": np.nan, "offline_sigma": 1.0}, "offline_mu"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        score(*_ok(), **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_zero_per_record_std_falls_back_to_pooled_with_warning(method):
    phi, member = _batch(8, 6, seed=2)
    phi[~member[:, 0], 0] = 1.5  # record 0: all OUT statistics equal
    phi[member[:, 1], 1] = -0.5  # record 1: all IN statistics equal
    r = score(phi, member, **_kw(method), moderated=False)
    for name in r.records.__dataclass_fields__:
        assert np.all(np.isfinite(getattr(r.records, name))), name
    assert not np.isnan(r.test_stat).any()
    if method in ("offline-per-record", "online-per-record"):
        assert any("pooled residual std" in w for w in r.warnings)
        assert r.records.sigma_out[0] > 0


def test_two_in_models_leave_one_out_falls_back_with_warning():
    # n_in = 2: leaving an IN model out leaves one IN value -> no std -> pooled std, warned.
    rng = np.random.default_rng(4)
    member = np.zeros((10, 4), dtype=bool)
    member[:2, 0] = True
    member[:5, 1:] = True
    phi = rng.normal(size=(10, 4)) + member
    r = score(phi, member, method="online-per-record", moderated=False)
    assert np.all(np.isfinite(r.test_stat))
    assert any("fewer than 2 values" in w for w in r.warnings)
    assert r.records.n_in[0] == 2 and r.records.n_out[0] == 8


def test_extreme_statistics_never_give_nan():
    phi, member = _batch(8, 6, seed=9)
    phi[:, 0] = np.where(member[:, 0], 1e150, -1e150) + np.arange(8) * 1e-150
    phi[:, 1] *= 1e-200
    for method in METHODS:
        r = score(phi, member, **_kw(method))
        assert not np.isnan(r.test_stat).any(), method
        assert np.all(np.isfinite(r.records.counted_p)), method


def test_warnings_for_few_models_ignored_options_and_silent_attacks():
    phi, member = _batch(8, 5, seed=1)
    r = score(phi, member, method="rmia", fixed_variance=True, offline_mu=0.0, offline_sigma=1.0)
    text = " | ".join(r.warnings)
    assert "only 8 models" in text
    assert "fixed_variance has no effect for rmia" in text
    assert "only used by offline-global" in text
    assert "cannot reach p < alpha" in text
    r = score(phi, member, method="offline-global", offline_mu=100.0, offline_sigma=1.0)
    assert np.all(r.records.counted_p == 0)
    assert any("never decided 'member'" in w for w in r.warnings)


# ---------------------------------------------------------------------------------------------
# API surface, speed, plots
# ---------------------------------------------------------------------------------------------


def test_result_shapes_and_types():
    phi, member = _batch(16, 12, seed=0)
    for method in METHODS:
        r = score(phi, member, **_kw(method))
        assert (r.method, r.n_models, r.n_records) == (method, 16, 12)
        for name in r.records.__dataclass_fields__:
            assert getattr(r.records, name).shape == (12,), name
        assert r.decisions.shape == r.test_stat.shape == (16, 12)
        assert r.decisions.dtype == bool
        assert r.records.n_in.dtype.kind == "i"
        assert np.all((-1 <= r.records.counted_p_ci_low) & (r.records.counted_p_ci_low <= r.records.counted_p))
        assert np.all((r.records.counted_p <= r.records.counted_p_ci_high) & (r.records.counted_p_ci_high <= 1))
        lo, mid, hi = r.records.score_ci_low, r.records.score, r.records.score_ci_high
        assert np.all((-1 <= lo) & (lo <= mid) & (mid <= hi) & (hi <= 1))
        b = r.batch
        assert b.fpr[0] == b.tpr[0] == 0 and b.fpr[-1] == b.tpr[-1] == 1
        assert 0 <= b.tpr_at_0_1pct_fpr <= b.tpr_at_1pct_fpr <= 1
        assert isinstance(b.auc, float)
    assert DEFAULT_METHOD == "online-per-record"
    assert HEADLINE == "score" and HEADLINE in r.records.__dataclass_fields__


@pytest.mark.parametrize("method", METHODS)
def test_plots_write_pngs(tmp_path, method):
    phi, member = _batch(16, 10, seed=0)
    r = score(phi, member, **_kw(method))
    for name, data in (
        ("roc", plots.roc_png(r, tmp_path / "roc.png")),
        ("hist", plots.score_hist_png(r, tmp_path / "hist.png")),
        ("rec", plots.record_diagnosis_png(r, phi, member, 3, tmp_path / "rec.png")),
    ):
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (tmp_path / f"{name}.png").read_bytes() == data
    with pytest.raises(ValueError, match="out of range"):
        plots.record_diagnosis_png(r, phi, member, 10)


# -- moderated (empirical-Bayes) per-record variances: the default -------------------------------


def test_variance_prior_recovers_a_known_prior():
    from ftps.privacy.scoring import _variance_prior

    # s_j^2 | sigma_j^2 ~ sigma_j^2 chi2_d / d with sigma_j^2 ~ nu0 s0^2 / chi2_nu0 (the model fitted)
    rng = np.random.default_rng(0)
    m, d, nu0, s02 = 20_000, 7.0, 10.0, 2.0
    sigma2 = nu0 * s02 / rng.chisquare(nu0, m)
    m2 = sigma2 * rng.chisquare(d, m)  # M2 = d s^2
    fit_nu0, fit_s02 = _variance_prior(m2, np.full(m, d))
    assert fit_nu0 == pytest.approx(nu0, rel=0.15) and fit_s02 == pytest.approx(s02, rel=0.05)
    # equal true variances: nothing beyond sampling noise, all the weight on the prior
    same = _variance_prior(rng.chisquare(d, m), np.full(m, d))
    assert same[0] > 200 and same[1] == pytest.approx(1.0, rel=0.05)


def _moderated_reference(phi, member):
    """Online LiRA with moderated variances, one (model, record) at a time: the prior (nu0, s0^2) of
    each group fitted once on all models (limma's moment equations), each std the posterior
    (nu0 s0^2 + M2) / (nu0 + d) of the record's group without the scored model."""
    from scipy import optimize, special

    n, m = phi.shape

    def prior(g):
        m2 = np.array([np.sum((phi[member[:, j] == g, j] - phi[member[:, j] == g, j].mean()) ** 2)
                       for j in range(m)])
        d = np.array([np.sum(member[:, j] == g) - 1.0 for j in range(m)])
        e = np.log(m2 / d) - special.digamma(d / 2) + np.log(d / 2)
        evar = e.var(ddof=1) - np.mean(special.polygamma(1, d / 2))
        nu0 = 2 * optimize.brentq(lambda y: special.polygamma(1, y) - evar, 1e-8, 1e8)
        return nu0, np.exp(e.mean() + special.digamma(nu0 / 2) - np.log(nu0 / 2))

    (nu_in, s_in2), (nu_out, s_out2) = prior(True), prior(False)
    stat = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            ins = phi[[k for k in range(n) if member[k, j] and k != i], j]
            outs = phi[[k for k in range(n) if not member[k, j] and k != i], j]
            sd_in = np.sqrt((nu_in * s_in2 + np.sum((ins - ins.mean()) ** 2)) / (nu_in + len(ins) - 1))
            sd_out = np.sqrt((nu_out * s_out2 + np.sum((outs - outs.mean()) ** 2)) / (nu_out + len(outs) - 1))
            stat[i, j] = stats.norm.logpdf(phi[i, j], ins.mean(), sd_in) - stats.norm.logpdf(
                phi[i, j], outs.mean(), sd_out)
    return stat


def test_moderated_online_matches_loop_reference():
    rng = np.random.default_rng(11)
    n, m = 10, 40
    member = make_masks(n, m, seed=3)
    # records whose spreads really differ (so the prior is finite), and a member effect
    phi = rng.normal(size=(n, m)) * rng.lognormal(0, 0.6, m) + member * 0.8
    r = score(phi, member, method="online-per-record")  # moderated by default
    np.testing.assert_allclose(r.test_stat, _moderated_reference(phi, member), rtol=1e-8, atol=1e-10)


def test_moderated_std_of_a_degenerate_record_is_positive_without_a_fallback():
    phi, member = _batch(8, 6, seed=2)
    phi[~member[:, 0], 0] = 1.5  # record 0: all OUT statistics equal
    r = score(phi, member)
    assert r.records.sigma_out[0] > 0 and np.isfinite(r.test_stat).all()
    assert not any("pooled residual std" in w for w in r.warnings)


def test_moderated_variances_make_a_stronger_attack_at_few_models():
    # 16 models, records whose spreads differ: own variances from 8 values each are noisy; the
    # moderated ones beat them, and come within a hair of one pooled variance (which, unlike them,
    # is wrong for every record whose spread is not typical: see the real-data figures in README).
    rng = np.random.default_rng(5)
    m = 2000
    sd = rng.lognormal(0, 0.5, m)
    effect = rng.gamma(1.0, 0.8, m) * sd
    aucs = {"own": [], "fixed": [], "moderated": []}
    for seed in range(3):
        member = make_masks(16, m, seed=seed)
        phi = rng.normal(size=member.shape) * sd + member * effect
        aucs["own"].append(score(phi, member, moderated=False).batch.auc)
        aucs["fixed"].append(score(phi, member, fixed_variance=True).batch.auc)
        aucs["moderated"].append(score(phi, member).batch.auc)
    mean = {k: float(np.mean(v)) for k, v in aucs.items()}
    assert mean["moderated"] > mean["own"] + 0.005 and mean["moderated"] > mean["fixed"] - 0.005, mean
