"""Privacy scores of a batch of records from a matrix of membership statistics (pure numpy/scipy).

This module is the maths of DESIGN.md §3 and nothing else: no gRPC, no torch, no I/O. The scorer
service and the ``ftps-score`` command both call :func:`score`.

Inputs (all methods):

- ``phi``: float ``[n, m]``, model ``i`` x record ``j``, the LiRA statistic
  ``phi = z_y - logsumexp_{c != y} z_c`` = ``log(p_y / (1 - p_y))`` of model ``i`` on record ``j``.
- ``member``: bool ``[n, m]``, the ground truth ``G``: record ``j`` was in model ``i``'s
  fine-tuning set ("IN"), else "OUT".

Per record ``j`` the attack takes one yes/no decision per model, ``LiRA(t_j, M_i)``, and the
privacy score is ``P_j = TPR_j - FPR_j`` (for balanced masks this is
``2 * mean_i[LiRA == G] - 1``, the formula of FT-PrivacyScore, Gu et al., CCS'24 demo), reported
with ``n_in``, ``n_out`` and a 95% interval.

Methods (``METHODS``):

``offline-global``
    The paper's attack: one Gaussian ``N(mu, sigma^2)`` of OUT statistics fitted on shadow models in
    the preparation stage (:func:`fit_offline_gaussian`). Member iff the one-sided p-value
    ``1 - Phi((phi - mu) / sigma) < alpha``.
``offline-per-record``
    Carlini et al., "Membership Inference Attacks From First Principles", S&P'22, offline LiRA: a
    per-record OUT Gaussian from the batch's own OUT models, leave-one-model-out. Same test.
``online-per-record`` (default)
    Carlini et al. S&P'22 online LiRA: per-record IN and OUT Gaussians, leave-one-model-out; member
    iff the log-likelihood ratio ``log N(phi; IN) - log N(phi; OUT) > 0``.

The per-record methods' variances are *moderated* by default (``moderated=True``): each record's
sample variance shrunk toward a prior fitted over the batch's records (empirical Bayes, Smyth 2004,
as limma moderates gene-wise variances; :func:`_moderated_sigma`). With few models a record's own
variance from n/2 values is noise; one pooled variance (``fixed_variance``) is wrong for records
that really differ; the prior weighs the two by how much the records' variances differ beyond
sampling noise. On the demo task (``bench/attacks.py``) it lifts the default attack's TPR at 0.1%
FPR from 0.028 to 0.083 at n=16 and 0.090 to 0.116 at n=32 (AUC 0.760 to 0.777 at n=16), with the
headline score's stability, fidelity and interval coverage unchanged. ``moderated=False`` keeps
each record's own variance.
``rmia``
    Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks", ICML'24, adapted to the
    batch (see :func:`_rmia`).

Leave-one-model-out: whenever model ``i`` is scored on record ``j``, every fitted quantity that
could contain model ``i``'s own value (per-record means and variances, pooled variances, RMIA
reference averages) is computed without model ``i``. Without it a model's own statistic pulls the
Gaussian it is tested against towards itself, which biases small-n scores.

Two scores per record (DESIGN.md §3), and which one is the headline (:data:`HEADLINE`):

- ``RecordScores.score`` (the headline): the model-based estimate of the attack's advantage,
  ``2 * Phi(d'/2) - 1`` with ``d' = (mu_in - mu_out) / sigma`` from the record's fitted IN/OUT
  Gaussians (TPR - FPR of the likelihood-ratio test for equal variances), with
  ``score_ci_low``/``score_ci_high``;
- ``RecordScores.counted_p``: the paper's counted ``P`` (above), with
  ``counted_p_ci_low``/``counted_p_ci_high``.

Why the model-based score is the headline (``bench/attacks.py`` on the demo task, Fashion-MNIST,
m=200, a pool of 512 fine-tuned models; at the demo's n=32): between two disjoint sets of 32
models its per-record Pearson correlation is 0.85 against 0.75 for online P; against the
reference (online LiRA on the other 480 models) Spearman 0.86 vs 0.83 and mean absolute error
0.12 vs 0.15; its 95% interval covers the reference 95% of the time at about half the width of
P's honest interval (0.57 vs 0.97). Counting n yes/no decisions adds binomial noise that the
fitted Gaussians average away, and P drifts with n (fewer models, weaker leave-one-out fits)
while the model-based estimate targets the same number at every n. The per-record AUC is the
threshold-free, distribution-free cross-check.

The same d' in the units privacy engineers use (:mod:`ftps.privacy.dp`): ``2 Phi(d'/2) - 1`` is
exactly the largest TPR - FPR against a mu-GDP mechanism with ``mu = |d'|``, reported per record as
``RecordScores.empirical_mu`` and as ``empirical_epsilon`` at ``delta`` (default 1e-5), each with
the interval mapped from d''s. They describe what this attack measured, not a guarantee.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from ftps.privacy import dp

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "HEADLINE",
    "MIN_MODELS",
    "RecordScores",
    "BatchMetrics",
    "ScoreResult",
    "fit_offline_gaussian",
    "score",
    "newcombe_interval",
    "wilson_interval",
    "roc_curve",
    "per_record_auc",
    "online_threshold",
]

METHODS = ("offline-global", "offline-per-record", "online-per-record", "rmia")
# bench/attacks.py on the demo task (Fashion-MNIST, m=200, 512 fine-tuned models): at the demo's
# n=32 online per-record LiRA with moderated variances is the strongest attack (AUC 0.785, TPR 0.212
# at 1% and 0.116 at 0.1% FPR; own variances 0.781 / 0.198 / 0.090, fixed variance 0.781 / 0.186 /
# 0.084, offline-per-record 0.715 / 0.163, rmia 0.696 / 0.125, the paper's offline-global 0.610 /
# 0.010), at every n, and its P is the most faithful to the reference.
DEFAULT_METHOD = "online-per-record"
# Which per-record number is the privacy score users see first (RecordScores field); the counted
# P is reported beside it. Chosen from bench/attacks.py, see the module docstring.
HEADLINE = "score"
MIN_MODELS = 4
# A per-record std at or below this fraction of the pooled std is treated as zero (degenerate).
_DEGENERATE_STD_REL = 1e-6
# Below this many models a single record's score is mostly binomial noise (DESIGN.md §3).
_FEW_MODELS_WARNING = 16
# Methods whose counted P gets the jackknife-widened interval (see _jackknife_widen), and the
# number of delete-a-group refits.
_JACKKNIFE_METHODS = ("offline-per-record", "online-per-record")
_JACKKNIFE_GROUPS = 8


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordScores:
    """Per-record results; every field is an array of shape ``[m]``.

    - ``score``: the headline, ``2 * Phi(d'/2) - 1``, ``d' = (mu_in - mu_out) / sigma`` with
      ``sigma`` the pooled std of the record's IN and OUT Gaussians; signed (negative when
      IN < OUT) (:data:`HEADLINE`).
    - ``score_ci_low``, ``score_ci_high``: its two-sided interval (:func:`_model_interval`):
      a t interval on ``d'`` from the spread of the complementary pairs' differences
      (Welch's when the masks are not complementary pairs), mapped to the score's scale.
    - ``counted_p``: the paper's counted privacy score ``P_j = TPR_j - FPR_j`` in ``[-1, 1]``.
    - ``counted_p_ci_low``, ``counted_p_ci_high``: two-sided interval for ``P_j``: Newcombe's
      hybrid score interval (:func:`newcombe_interval`), for ``offline-per-record`` and
      ``online-per-record`` widened by a delete-a-group jackknife (:func:`_jackknife_widen`).
    - ``n_in``, ``n_out`` (int): number of models with record ``j`` IN / OUT.
    - ``auc``: threshold-free ``P(phi_IN > phi_OUT)`` over the record's IN x OUT model pairs,
      ties count 1/2.
    - ``mu_in``, ``sigma_in``, ``mu_out``, ``sigma_out``: the record's IN/OUT Gaussians fitted on
      *all* its models (no leave-one-out; for plots). ``sigma_*`` are the values the method uses:
      the pooled residual std under ``fixed_variance`` (offline-per-record pools OUT residuals
      only, so its ``sigma_in`` stays per-record), the pooled std where a record's own std is
      degenerate, else the record's own std (ddof=1).
    - ``empirical_mu``, ``empirical_mu_ci_low``, ``empirical_mu_ci_high``: the exposure this
      attack measured in Gaussian-DP units, ``mu = |d'|`` (:mod:`ftps.privacy.dp`), with the
      interval mapped from d''s.
    - ``empirical_epsilon``, ``empirical_epsilon_ci_low``, ``empirical_epsilon_ci_high``: the same
      as an (epsilon, delta) pair at the result's ``delta``
      (:func:`ftps.privacy.dp.epsilon_at_delta`); 0 at ``mu = 0``. Empirical estimates of what
      this attack saw, not guarantees.
    """

    score: np.ndarray
    score_ci_low: np.ndarray
    score_ci_high: np.ndarray
    counted_p: np.ndarray
    counted_p_ci_low: np.ndarray
    counted_p_ci_high: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    auc: np.ndarray
    mu_in: np.ndarray
    sigma_in: np.ndarray
    mu_out: np.ndarray
    sigma_out: np.ndarray
    empirical_mu: np.ndarray
    empirical_mu_ci_low: np.ndarray
    empirical_mu_ci_high: np.ndarray
    empirical_epsilon: np.ndarray
    empirical_epsilon_ci_low: np.ndarray
    empirical_epsilon_ci_high: np.ndarray


@dataclass(frozen=True)
class BatchMetrics:
    """ROC of the attack over all ``n * m`` (model, record) pairs of the batch.

    ``fpr``/``tpr``: the ROC curve, shape ``[k]``, from ``(0, 0)`` to ``(1, 1)``, one point per
    distinct threshold (see :func:`roc_curve`).
    """

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    fpr: np.ndarray
    tpr: np.ndarray


@dataclass(frozen=True)
class ScoreResult:
    """Everything :func:`score` computes.

    ``decisions``: bool ``[n, m]``, the attack says "member". ``test_stat``: float ``[n, m]``,
    higher = more likely member; what the ROC ranks (may hold +-inf, never NaN). The trailing fields
    record the settings the result was computed with (the diagnosis plot needs them).
    """

    method: str
    n_models: int
    n_records: int
    records: RecordScores
    batch: BatchMetrics
    decisions: np.ndarray
    test_stat: np.ndarray
    warnings: list[str]
    alpha: float = 0.05
    confidence: float = 0.95
    fixed_variance: bool = False
    offline_mu: float | None = None
    offline_sigma: float | None = None
    delta: float = dp.DEFAULT_DELTA


# --------------------------------------------------------------------------------------------
# The offline Gaussian
# --------------------------------------------------------------------------------------------


def fit_offline_gaussian(phi_out: np.ndarray) -> tuple[float, float]:
    """Fit the offline Gaussian of the preparation stage: ``(mean, std)`` (ddof=1).

    ``phi_out``: OUT statistics of any shape (e.g. ``[k, r]``: k shadow models x r held-out
    records); flattened. Raises ValueError on non-finite values, fewer than 2 values or zero std.
    """
    x = np.asarray(phi_out)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"phi_out must be a real numeric array, got dtype {x.dtype}")
    x = x.astype(np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"need at least 2 OUT statistics to fit a Gaussian, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"phi_out has {int(np.sum(~np.isfinite(x)))} non-finite value(s)")
    mu, sigma = float(np.mean(x)), float(np.std(x, ddof=1))
    if not sigma > 0:
        raise ValueError("phi_out has zero variance: cannot fit the offline Gaussian")
    return mu, sigma


# --------------------------------------------------------------------------------------------
# Small statistics helpers (public: tested directly and reused by plots/reports)
# --------------------------------------------------------------------------------------------


def wilson_interval(
    k: np.ndarray, n: np.ndarray, *, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion ``k / n`` (elementwise; ``n`` > 0)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = stats.norm.isf((1.0 - confidence) / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z / denom * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def newcombe_interval(
    k1: np.ndarray, n1: np.ndarray, k2: np.ndarray, n2: np.ndarray, *, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Interval for ``k1/n1 - k2/n2``, two independent binomial proportions (elementwise).

    Newcombe's hybrid score interval ("method 10" of R. G. Newcombe, Interval estimation for the
    difference between independent proportions, Statistics in Medicine 17:873-890, 1998): with
    Wilson intervals ``(l1, u1)``, ``(l2, u2)`` and ``d = p1 - p2``::

        low  = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)

    It stays inside ``[-1, 1]``, is never degenerate at 0 or n successes, and has close to nominal
    coverage for small n (unlike the Wald interval). Clipped to ``[-1, 1]`` against rounding.
    """
    k1, n1, k2, n2 = (np.asarray(a, dtype=np.float64) for a in (k1, n1, k2, n2))
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, confidence=confidence)
    l2, u2 = wilson_interval(k2, n2, confidence=confidence)
    d = p1 - p2
    low = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)


def roc_curve(test_stat: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of ``test_stat`` (higher = member) against bool ``member``, any equal shapes.

    Returns ``(fpr, tpr)``, one point per distinct threshold plus ``(0, 0)``; tied statistics form
    one point, so the trapezoidal area equals ``P(stat_IN > stat_OUT) + P(tie)/2``. +-inf allowed.
    """
    s = np.asarray(test_stat, dtype=np.float64).ravel()
    y = np.asarray(member, dtype=bool).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # Last index of each run of equal statistics (!= rather than diff, which gives NaN at inf).
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = np.cumsum(~y)[last]
    tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~y).sum()), 1)]
    return fpr, tpr


def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among ROC points with FPR <= target (Carlini et al. S&P'22 low-FPR metric)."""
    return float(np.max(tpr[fpr <= target]))


def per_record_auc(phi: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Per-record ``P(phi_IN > phi_OUT)`` over IN x OUT model pairs, ties 1/2. ``[n, m] -> [m]``.

    Mann-Whitney U from mid-ranks along the model axis, so it is exact with ties.
    """
    ranks = stats.rankdata(phi, axis=0)  # mid-ranks, [n, m]
    n_in = member.sum(axis=0).astype(np.float64)
    n_out = member.shape[0] - n_in
    u = np.where(member, ranks, 0.0).sum(axis=0) - n_in * (n_in + 1.0) / 2.0
    return u / (n_in * n_out)


def online_threshold(
    mu_in: float, sigma_in: float, mu_out: float, sigma_out: float
) -> list[float]:
    """Statistic values where the online LiRA log-likelihood ratio is 0 (0, 1 or 2 roots).

    ``log N(x; mu_in, sigma_in^2) = log N(x; mu_out, sigma_out^2)`` is a quadratic in ``x``.
    """
    a = 1.0 / sigma_out**2 - 1.0 / sigma_in**2
    b = 2.0 * (mu_in / sigma_in**2 - mu_out / sigma_out**2)
    c = mu_out**2 / sigma_out**2 - mu_in**2 / sigma_in**2 + 2.0 * np.log(sigma_out / sigma_in)
    # a x^2 + b x + c = 0, from 2*LLR = a x^2 + b x + c.
    if abs(a) <= 1e-12 * max(1.0 / sigma_out**2, 1.0 / sigma_in**2):
        return [] if b == 0 else [float(-c / b)]
    disc = b * b - 4.0 * a * c
    if disc < 0:
        return []
    r = np.sqrt(disc)
    return sorted(float(x) for x in ((-b - r) / (2.0 * a), (-b + r) / (2.0 * a)))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate(phi, member) -> tuple[np.ndarray, np.ndarray]:
    phi_a = np.asarray(phi)
    member_a = np.asarray(member)
    if phi_a.ndim != 2:
        raise ValueError(f"phi must be a 2-D array [n_models, n_records], got shape {phi_a.shape}")
    if member_a.shape != phi_a.shape:
        raise ValueError(
            f"shape mismatch: phi has shape {phi_a.shape} but member has shape {member_a.shape}"
        )
    if phi_a.dtype == bool or not np.issubdtype(phi_a.dtype, np.number) or np.iscomplexobj(phi_a):
        raise ValueError(f"phi must be a real floating-point array, got dtype {phi_a.dtype}")
    phi_a = phi_a.astype(np.float64)
    bad = ~np.isfinite(phi_a)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"phi has {int(bad.sum())} non-finite value(s) (NaN or inf), first at model {i}, "
            f"record {j}"
        )
    if member_a.dtype == bool:
        member_b = member_a
    elif np.issubdtype(member_a.dtype, np.integer):
        if not np.isin(member_a, (0, 1)).all():
            raise ValueError("member must be boolean (or integers 0/1); found other integers")
        member_b = member_a.astype(bool)
    else:
        raise ValueError(f"member must be boolean (or integers 0/1), got dtype {member_a.dtype}")
    n, m = phi_a.shape
    if n < MIN_MODELS:
        raise ValueError(f"need at least {MIN_MODELS} models, got {n}")
    if m < 1:
        raise ValueError("need at least 1 record, got 0")
    n_in = member_b.sum(axis=0)
    for what, counts in (("IN", n_in), ("OUT", n - n_in)):
        few = np.flatnonzero(counts < 2)
        if few.size:
            j = int(few[0])
            raise ValueError(
                f"{few.size} record(s) have fewer than 2 {what} models (record {j} has "
                f"{int(counts[j])}); every record needs at least 2 IN and 2 OUT models"
            )
    return phi_a, member_b


# --------------------------------------------------------------------------------------------
# Gaussian fits with leave-one-model-out
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GroupFit:
    """Per-record moments of one group (IN or OUT) of models; arrays ``[m]`` unless noted."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray  # sum of squared deviations from the mean
    resid: np.ndarray  # [n, m] phi - mean where the model is in the group, else 0
    loo_count: np.ndarray  # [n, m] group size without model i
    loo_mean: np.ndarray  # [n, m] group mean without model i
    loo_m2: np.ndarray  # [n, m] group M2 without model i


def _group_fit(phi: np.ndarray, in_group: np.ndarray) -> _GroupFit:
    """Moments of ``phi`` over the models in ``in_group`` (bool ``[n, m]``), with and without each
    model. For a model outside the group the leave-one-out moments are the full ones.

    Removing ``x`` from ``(c, mu, M2)``: ``mu' = mu - (x - mu)/(c - 1)``,
    ``M2' = M2 - c/(c - 1) (x - mu)^2`` (exact; clipped at 0 against rounding).
    """
    w = in_group.astype(np.float64)
    count = w.sum(axis=0)
    mean = (w * phi).sum(axis=0) / count
    resid = w * (phi - mean)
    m2 = (resid**2).sum(axis=0)
    loo_count = count - w
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.where(in_group, 1.0 / np.maximum(loo_count, 1.0), 0.0)
        loo_mean = mean - resid * shrink
        loo_m2 = m2 - resid**2 * count * shrink
    # The subtraction loses ~1e-16 * M2; what is left below that is rounding, i.e. zero spread.
    loo_m2 = np.where(loo_m2 > 1e-12 * m2, loo_m2, 0.0)
    return _GroupFit(count, mean, m2, resid, loo_count, loo_mean, loo_m2)


def _pooled_var(groups: list[_GroupFit]) -> tuple[float, np.ndarray]:
    """Pooled residual variance over all records of the given groups: full and per left-out model.

    ``sum_j sum_g M2_gj / sum_j sum_g (c_gj - 1)`` — residuals around each record's *own* group
    mean, so differences between records (and IN vs OUT) do not inflate it. Leaving model ``i`` out
    removes its residual from every record (returned as ``[n]``).
    """
    m2 = sum(float(g.m2.sum()) for g in groups)
    dof = sum(float((g.count - 1.0).sum()) for g in groups)
    loo_m2 = np.full(groups[0].resid.shape[0], m2)
    loo_dof = np.full(groups[0].resid.shape[0], dof)
    for g in groups:
        # resid is 0 outside the group, so only the group's own entries are dropped.
        loo_m2 = loo_m2 - (g.resid**2 * (g.count / (g.count - 1.0))).sum(axis=1)
        loo_dof = loo_dof - (g.loo_count < g.count).sum(axis=1)
    var = m2 / dof if dof > 0 else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        loo_var = np.where(loo_dof > 0, np.maximum(loo_m2, 0.0) / np.maximum(loo_dof, 1.0), 0.0)
    return var, loo_var


class _Warn:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)


def _require_positive(sigma_loo: np.ndarray, what: str) -> None:
    if not np.all(sigma_loo > 0):
        raise ValueError(
            f"zero variance: with a model left out, the {what} statistics do not vary around "
            "each record's own mean, not even pooled over all records (constant phi, or too few "
            "models/records), so no Gaussian can be fitted"
        )


def _sigma_with_fallback(
    g: _GroupFit,
    pooled: float,
    pooled_loo: np.ndarray,
    warn: _Warn,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-record std (full ``[m]`` and leave-one-out ``[n, m]``), ddof=1; where a record's std is
    undefined (< 2 values) or degenerate (<= 1e-6 x pooled std) use the pooled residual std."""
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.sqrt(g.m2 / (g.count - 1.0))
        loo = np.sqrt(g.loo_m2 / (g.loo_count - 1.0))
    bad_full = ~(full > _DEGENERATE_STD_REL * pooled)
    full = np.where(bad_full, pooled, full)
    pooled_loo_2d = np.broadcast_to(pooled_loo[:, None], loo.shape)
    bad_loo = (g.loo_count < 2) | ~(loo > _DEGENERATE_STD_REL * pooled_loo_2d)
    loo = np.where(bad_loo, pooled_loo_2d, loo)
    n_bad = int(np.sum(bad_full | bad_loo.any(axis=0)))
    if n_bad:
        warn(
            f"{n_bad} record(s) have a degenerate per-record {what} std (zero, or fewer than 2 "
            f"values once the scored model is left out); the pooled residual std was used for them"
        )
    return full, loo


def _trigamma_inverse(x: float) -> float:
    """The ``y > 0`` with ``trigamma(y) = x`` (``x > 0``): Newton's iteration of Smyth (2004),
    on ``1/trigamma``, which is nearly linear in ``y``."""
    if x > 1e7:
        return 1.0 / np.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = float(special.polygamma(1, y))
        step = tri * (1.0 - tri / x) / float(special.polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


def _variance_prior(m2: np.ndarray, dof: np.ndarray) -> tuple[float, float]:
    """Empirical-Bayes prior of per-record variances (Smyth 2004, limma's ``fitFDist``): the
    records' sample variances ``s_j^2 = M2_j / d_j`` are taken as scaled chi-square draws around a
    scaled-inverse-chi-square prior ``(nu0, s0^2)``, fitted by the moments of ``log s_j^2``.
    Returns ``(nu0, s0^2)``; ``nu0 = inf`` when the records' variances vary no more than sampling
    alone explains (then every record gets ``s0^2``: the pooled, fixed variance)."""
    ok = (dof > 0) & (m2 > 0) & np.isfinite(m2)
    if ok.sum() < 3:
        return np.inf, float(m2.sum() / max(dof.sum(), 1.0))
    d = dof[ok]
    e = np.log(m2[ok] / d) - special.digamma(d / 2.0) + np.log(d / 2.0)
    emean = float(e.mean())
    evar = float(e.var(ddof=1) - np.mean(special.polygamma(1, d / 2.0)))
    if evar <= 0:
        return np.inf, float(np.exp(emean))
    nu0 = 2.0 * _trigamma_inverse(evar)
    return nu0, float(np.exp(emean + special.digamma(nu0 / 2.0) - np.log(nu0 / 2.0)))


def _moderated_sigma(g: _GroupFit, pooled: float, pooled_loo: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-record std shrunk toward the records' common prior (:func:`_variance_prior`): the
    posterior ``(nu0 s0^2 + M2_j) / (nu0 + d_j)``, full ``[m]`` and leave-one-model-out ``[n, m]``,
    and ``nu0`` (the prior's weight in degrees of freedom). Between per-record variances (noisy at
    few models) and one pooled variance (wrong for records that really differ), weighted by how
    much the records' variances differ beyond sampling noise. Never zero while ``s0 > 0``. The
    prior is fitted once on all models: model i's share in it is one residual among the m records'
    (n - 2) m, too little to pull a record's Gaussian toward model i's own statistic."""
    nu0, s02 = _variance_prior(g.m2, g.count - 1.0)
    if not np.isfinite(nu0):
        # All the weight on the prior: the pooled std the method would fall back to (``pooled``,
        # ``pooled_loo`` [n]), leave-one-model-out exactly as under fixed_variance.
        return np.full(g.m2.shape, pooled), np.broadcast_to(pooled_loo[:, None], g.loo_m2.shape), nu0
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.sqrt((nu0 * s02 + g.m2) / (nu0 + g.count - 1.0))
        loo = np.sqrt((nu0 * s02 + g.loo_m2) / (nu0 + np.maximum(g.loo_count - 1.0, 0.0)))
    return full, loo, nu0


def _norm_logpdf_diff(x, mu_in, s_in, mu_out, s_out) -> np.ndarray:
    """``log N(x; mu_in, s_in^2) - log N(x; mu_out, s_out^2)``, written so it cannot be NaN for
    finite inputs (a difference of squares is factored rather than subtracted)."""
    z_in = (x - mu_in) / s_in
    z_out = (x - mu_out) / s_out
    with np.errstate(over="ignore"):
        return 0.5 * (z_out - z_in) * (z_out + z_in) - np.log(s_in / s_out)


# --------------------------------------------------------------------------------------------
# RMIA
# --------------------------------------------------------------------------------------------


def _loo_logmeanexp(logv: np.ndarray, in_group: np.ndarray) -> np.ndarray:
    """``log mean_{k in group, k != i} exp(logv[k, j])`` for every ``[i, j]`` (``-inf`` where the
    reduced group is empty). Exclusive prefix and suffix ``logaddexp`` scans along the model axis,
    so no large term is ever subtracted from a small sum (no cancellation)."""
    v = np.where(in_group, logv, -np.inf)
    ninf = np.full((1, v.shape[1]), -np.inf)
    prefix = np.concatenate([ninf, np.logaddexp.accumulate(v, axis=0)[:-1]], axis=0)
    suffix = np.concatenate([np.logaddexp.accumulate(v[::-1], axis=0)[::-1][1:], ninf], axis=0)
    loo_count = in_group.sum(axis=0)[None, :] - in_group
    return np.logaddexp(prefix, suffix) - np.log(np.maximum(loo_count, 1))


def _rmia(
    phi: np.ndarray, member: np.ndarray, *, alpha: float, warn: _Warn
) -> tuple[np.ndarray, np.ndarray]:
    """RMIA (Zarifzadeh et al., ICML'24) adapted to the batch design. Returns ``(test_stat,
    decisions)``, both ``[n, m]``.

    Adaptation (offline RMIA with the batch's own OUT models as reference models):

    - ``Pr(x | theta_i) = sigmoid(phi_ij)``: ``phi`` is the logit of the true-label probability.
    - ``Pr(x) = mean over the reference models`` = the OUT models of record ``j`` other than model
      ``i`` (leave-one-model-out). This is the paper's offline ``Pr(x)`` with ``a = 1`` (no
      correction for the missing IN models; ``a`` is a tuned hyper-parameter there, and with the
      rank test below only the per-record normalisation matters).
    - Population ``Z_i``: the batch records that are OUT for model ``i`` (other than ``j``); each
      ``z`` gets its own ratio ``Pr(z | theta_i) / Pr(z)`` with the same leave-one-out reference.
    - ``Score_MIA(x; theta_i) = Pr_z[LR(x, z) >= gamma]`` with ``gamma = 1``: the fraction of the
      population whose ratio the target's ratio beats (ties 1/2). This is ``test_stat``, in [0, 1].
    - Decision: a rank (conformal) test at level ``alpha``:
      ``p = (1 + #{z : ratio_z >= ratio_x}) / (1 + |Z_i|) < alpha``. Under the null (``x`` OUT for
      model ``i``) ``x`` and ``Z_i`` are all non-members normalised the same way, so ``p`` is close
      to uniform and the per-model false-positive rate is about ``alpha``. With ``|Z_i| + 1 <
      1/alpha`` the test can never fire (a warning says so).

    Probabilities saturate: for records every model fits with ``p_y ~ 1`` the ratios are all ~1,
    so RMIA (unlike LiRA in logit space) sees little signal there.
    """
    n, m = phi.shape
    out = ~member
    logp = -np.logaddexp(0.0, -phi)  # log sigmoid(phi), stable
    log_ref = _loo_logmeanexp(logp, out)  # [n, m]; finite: every record has >= 2 OUT models
    log_ratio = logp - log_ref
    test_stat = np.empty((n, m))
    p_value = np.empty((n, m))
    n_pop_min = m
    for i in range(n):
        pop = np.sort(log_ratio[i, out[i]])
        below = np.searchsorted(pop, log_ratio[i], side="left").astype(np.float64)
        at_or_below = np.searchsorted(pop, log_ratio[i], side="right").astype(np.float64)
        # Remove the target itself from its model's population when it is OUT for that model.
        self_in_pop = out[i].astype(np.float64)
        n_pop = pop.size - self_in_pop
        ties = at_or_below - below - self_in_pop
        above_or_tied = pop.size - below - self_in_pop
        with np.errstate(divide="ignore", invalid="ignore"):
            test_stat[i] = np.where(n_pop > 0, (below + 0.5 * ties) / n_pop, 0.5)
        p_value[i] = (1.0 + above_or_tied) / (1.0 + n_pop)
        n_pop_min = min(n_pop_min, int(n_pop.min()))
    if 1.0 / (1.0 + n_pop_min) >= alpha:  # the smallest attainable p-value
        warn(
            f"rmia: some model has only {n_pop_min} population (OUT) record(s) besides the target; "
            f"its rank test cannot reach p < alpha={alpha:g} (needs at least "
            f"{int(np.floor(1.0 / alpha))})"
        )
    return test_stat, p_value < alpha


# --------------------------------------------------------------------------------------------
# The attack, the model-based interval, the jackknife
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decisions:
    g_in: _GroupFit
    g_out: _GroupFit
    s_in: np.ndarray  # [m] per-record IN std the method uses (full fit)
    s_out: np.ndarray  # [m]
    pooled_all: float  # pooled residual std of IN and OUT
    pooled_dof: float  # its degrees of freedom
    prior_dof: float  # moderated variances: the priors' nu0, IN + OUT (0 otherwise; inf: pooled)
    test_stat: np.ndarray  # [n, m]
    decisions: np.ndarray  # [n, m] bool


def _decide(
    phi: np.ndarray,
    member: np.ndarray,
    *,
    method: str,
    alpha: float,
    fixed_variance: bool,
    offline_mu: float | None,
    offline_sigma: float | None,
    warn: _Warn,
    moderated: bool = False,
) -> _Decisions:
    """The attack on validated ``phi``/``member`` ``[n, m]``: fits (leave-one-model-out), the
    test statistic and the decisions. Everything downstream (P, intervals, ROC) is counting."""
    n, m = phi.shape
    g_in = _group_fit(phi, member)
    g_out = _group_fit(phi, ~member)
    var_all, var_all_loo = _pooled_var([g_in, g_out])
    var_out, var_out_loo = _pooled_var([g_out])
    pooled_all, pooled_all_loo = np.sqrt(var_all), np.sqrt(var_all_loo)
    pooled_out, pooled_out_loo = np.sqrt(var_out), np.sqrt(var_out_loo)

    # Per-record sigmas the method uses: full fits ([m], for reporting and the model-based score) and
    # leave-one-model-out fits ([n, m], for decisions). A zero std is an error only where a
    # decision needs it and no pooled fallback exists.
    prior_dof = 0.0
    if moderated and not fixed_variance and method in ("offline-per-record", "online-per-record"):
        s_in, s_in_loo, nu_in = _moderated_sigma(g_in, pooled_all, pooled_all_loo)
        fb, fb_loo = (pooled_out, pooled_out_loo) if method == "offline-per-record" else (pooled_all, pooled_all_loo)
        s_out, s_out_loo, nu_out = _moderated_sigma(g_out, fb, fb_loo)
        prior_dof = nu_in + nu_out
        if method == "online-per-record":
            _require_positive(s_in_loo, "IN")
        _require_positive(s_out_loo, "OUT")
    elif fixed_variance and method == "online-per-record":
        _require_positive(pooled_all_loo, "IN/OUT")
        s_in = s_out = np.full(m, pooled_all)
        s_in_loo = s_out_loo = np.broadcast_to(pooled_all_loo[:, None], (n, m))
    else:
        s_in, s_in_loo = _sigma_with_fallback(g_in, pooled_all, pooled_all_loo, warn, "IN")
        if method == "online-per-record":
            _require_positive(s_in_loo, "IN")
        if fixed_variance and method == "offline-per-record":
            _require_positive(pooled_out_loo, "OUT")
            s_out = np.full(m, pooled_out)
            s_out_loo = np.broadcast_to(pooled_out_loo[:, None], (n, m))
        else:
            fb, fb_loo = (
                (pooled_out, pooled_out_loo)
                if method == "offline-per-record"
                else (pooled_all, pooled_all_loo)
            )
            s_out, s_out_loo = _sigma_with_fallback(g_out, fb, fb_loo, warn, "OUT")
            if method in ("offline-per-record", "online-per-record"):
                _require_positive(s_out_loo, "OUT")
    if not var_all > 0:  # only reachable for offline-global and rmia, which need no Gaussian
        warn(
            "phi has zero variance around each record's IN and OUT means: the model-based "
            "score is its limit sign(mu_in - mu_out)"
        )

    if method == "offline-global":
        test_stat = (phi - offline_mu) / offline_sigma
        decisions = stats.norm.sf(test_stat) < alpha
    elif method == "offline-per-record":
        test_stat = (phi - g_out.loo_mean) / s_out_loo
        decisions = stats.norm.sf(test_stat) < alpha
    elif method == "online-per-record":
        test_stat = _norm_logpdf_diff(phi, g_in.loo_mean, s_in_loo, g_out.loo_mean, s_out_loo)
        decisions = test_stat > 0
    else:
        test_stat, decisions = _rmia(phi, member, alpha=alpha, warn=warn)
    if np.isnan(test_stat).any():  # only for statistics near the float64 limit (~1e308)
        raise ValueError("phi values are too extreme to score (the test statistic overflows)")

    return _Decisions(
        g_in=g_in, g_out=g_out, s_in=np.asarray(s_in, dtype=np.float64),
        s_out=np.asarray(s_out, dtype=np.float64), pooled_all=float(pooled_all),
        pooled_dof=_pooled_dof(g_in, g_out), prior_dof=prior_dof, test_stat=test_stat,
        decisions=decisions,
    )


def _pooled_dof(g_in: _GroupFit, g_out: _GroupFit) -> float:
    return float((g_in.count - 1.0).sum() + (g_out.count - 1.0).sum())


def _canonical_rank(phi: np.ndarray) -> np.ndarray:
    """A rank of each model that depends only on its own statistics, not on the order models or
    records arrive in (sorted row values, compared lexicographically). Used to pair duplicate
    masks and to form jackknife groups, so results stay invariant under both permutations."""
    keys = np.sort(phi, axis=1)
    order = np.lexsort(keys.T[::-1])  # lexsort's last key is the primary one
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _complementary_pairs(member: np.ndarray, rank: np.ndarray) -> np.ndarray | None:
    """``[K, 2]`` model indices such that every model is in exactly one pair whose masks are
    complementary (the production design, :func:`ftps.privacy.masks.make_masks`), else None.

    Complementary models are fine-tuned on complementary halves of the batch, so their
    statistics on a record are correlated (about -0.4 on Fashion-MNIST); the pair difference is
    the unit of independent information. Among duplicate masks, models pair in
    :func:`_canonical_rank` order. Pairs are listed in rank order of their lower-ranked model."""
    n = member.shape[0]
    if n % 2:
        return None
    packed = np.packbits(member, axis=1)
    keys = [row.tobytes() for row in packed]
    complements = [row.tobytes() for row in np.packbits(~member, axis=1)]
    groups: dict[bytes, list[int]] = {}
    for i in np.argsort(rank, kind="stable"):
        groups.setdefault(keys[i], []).append(int(i))
    pairs: list[tuple[int, int]] = []
    for key, models in groups.items():
        partner = complements[models[0]]
        if key > partner:
            continue  # every (mask, complement) group is handled once
        others = groups.get(partner)
        if others is None or len(others) != len(models):
            return None
        pairs.extend(zip(models, others))
    out = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return out[np.argsort(np.minimum(rank[out[:, 0]], rank[out[:, 1]]), kind="stable")]


def _jackknife_groups(
    member: np.ndarray, pairs: np.ndarray | None, rank: np.ndarray
) -> list[np.ndarray]:
    """Delete-a-group jackknife groups: ``_JACKKNIFE_GROUPS`` groups of whole complementary pairs
    (or of models in canonical order when the masks are not paired)."""
    if pairs is not None:
        k = min(_JACKKNIFE_GROUPS, len(pairs))
        return [pairs[g].ravel() for g in np.array_split(np.arange(len(pairs)), k)]
    k = min(_JACKKNIFE_GROUPS, member.shape[0] // 2)
    return list(np.array_split(np.argsort(rank, kind="stable"), k))


def _jackknife_widen(
    phi: np.ndarray,
    member: np.ndarray,
    p: np.ndarray,
    ci_low: np.ndarray,
    ci_high: np.ndarray,
    *,
    groups: list[np.ndarray],
    confidence: float,
    decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
    warn: _Warn,
) -> tuple[np.ndarray, np.ndarray]:
    """Widen Newcombe's interval by the over-dispersion a delete-a-group jackknife measures.

    Newcombe's interval treats a record's n decisions as independent. They are not: every
    decision is taken against Gaussians fitted on the same record's other models, and
    complementary models err together. The jackknife refits the attack without each group of
    models (``decide(phi, member) -> decisions``), giving ``P_(g)``; its variance
    ``(G-1)/G * sum_g (P_(g) - mean)^2`` captures both. Where it exceeds the variance implied by
    Newcombe's interval, both half-widths are scaled by the square root of the ratio (never
    narrowed, so Newcombe's behaviour at 0 and n successes is kept). Records that would keep
    fewer than 2 IN or 2 OUT models once a group is deleted keep Newcombe's interval (warned).
    """
    n_in, n_out = member.sum(axis=0), (~member).sum(axis=0)
    ok = np.ones(member.shape[1], dtype=bool)
    for g in groups:
        g_in = member[g].sum(axis=0)
        ok &= (n_in - g_in >= 2) & (n_out - (len(g) - g_in) >= 2)
    if not ok.all():
        warn(
            f"{int((~ok).sum())} record(s) have too few IN or OUT models for the jackknife: their "
            "interval of P treats the n decisions as independent and is too narrow"
        )
    if len(groups) < 2 or not ok.any():
        return ci_low, ci_high
    ps = np.empty((len(groups), int(ok.sum())))
    for k, g in enumerate(groups):
        keep = np.ones(phi.shape[0], dtype=bool)
        keep[g] = False
        ph, mb = phi[keep][:, ok], member[keep][:, ok]
        try:
            dec = decide(ph, mb)
        except ValueError as exc:
            warn(
                f"jackknife refit failed ({exc}); the interval of P treats the decisions as "
                "independent"
            )
            return ci_low, ci_high
        k_in = mb.sum(axis=0)
        ps[k] = (dec & mb).sum(axis=0) / k_in - (dec & ~mb).sum(axis=0) / (mb.shape[0] - k_in)
    k = len(groups)
    v_jack = (k - 1) / k * ((ps - ps.mean(axis=0)) ** 2).sum(axis=0)
    z = stats.norm.isf((1.0 - confidence) / 2.0)
    v_newcombe = ((ci_high[ok] - ci_low[ok]) / (2.0 * z)) ** 2  # > 0: never degenerate
    widen = np.ones_like(p)
    widen[ok] = np.sqrt(np.maximum(1.0, v_jack / v_newcombe))
    return (
        np.clip(p - (p - ci_low) * widen, -1.0, 1.0),
        np.clip(p + (ci_high - p) * widen, -1.0, 1.0),
    )


def _model_interval(
    phi: np.ndarray,
    member: np.ndarray,
    g_in: _GroupFit,
    g_out: _GroupFit,
    s_norm: np.ndarray,
    df_norm: np.ndarray,
    *,
    pooled_std: float,
    pairs: np.ndarray | None,
    confidence: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Interval ``(d_low, d_high)`` for ``d' = gap / s_norm`` with ``gap = mu_in - mu_out`` (arrays
    ``[m]``); the score ``2 Phi(d'/2) - 1`` and the GDP ``mu = |d'|`` map it through.

    ``Var(d') ~ Var(gap) / s_norm^2 + d'^2 / (2 df_norm)`` (the second term: the normaliser is
    estimated, Hedges & Olkin 1985). ``Var(gap)``: with complementary pairs
    (:func:`ftps.privacy.masks.make_masks`) the variance of the K pair differences
    ``phi_IN - phi_OUT`` over K, with a t quantile on ``K - 1`` degrees of freedom — the pair
    correlation is real and would otherwise make the interval too narrow; without pairs Welch's
    ``v_in/n_in + v_out/n_out`` with Welch's degrees of freedom. Records whose variance is
    degenerate use the pooled residual std.
    """
    n_in, n_out = g_in.count, g_out.count
    floor = (_DEGENERATE_STD_REL * pooled_std) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        v_in = np.where(g_in.m2 / (n_in - 1.0) > floor, g_in.m2 / (n_in - 1.0), pooled_std**2)
        v_out = np.where(
            g_out.m2 / (n_out - 1.0) > floor, g_out.m2 / (n_out - 1.0), pooled_std**2
        )
        a, b = v_in / n_in, v_out / n_out
        var_gap = a + b
        welch = var_gap**2 / (a**2 / (n_in - 1.0) + b**2 / (n_out - 1.0))
        df = np.where(var_gap > 0, welch, 1.0)
        if pairs is not None:
            k = len(pairs)
            i, j = pairs[:, 0], pairs[:, 1]
            diff = np.where(member[i], phi[i] - phi[j], phi[j] - phi[i])  # [K, m]
            var_pairs = diff.var(axis=0, ddof=1) / k
            ok = var_pairs > floor * (1.0 / n_in + 1.0 / n_out)
            var_gap = np.where(ok, var_pairs, var_gap)
            df = np.where(ok, k - 1.0, df)
        gap = g_in.mean - g_out.mean
        d = gap / s_norm
        se = np.sqrt(var_gap / s_norm**2 + d**2 / (2.0 * df_norm))
    t = stats.t.isf((1.0 - confidence) / 2.0, np.maximum(df, 1.0))
    ok = (s_norm > 0) & np.isfinite(se)
    d, se = np.where(ok, d, 0.0), np.where(ok, se, 0.0)
    edge = _dprime_without_spread(gap)  # both ends, where d' has no spread to be uncertain in
    return np.where(ok, d - t * se, edge), np.where(ok, d + t * se, edge)


def _dprime_without_spread(gap: np.ndarray) -> np.ndarray:
    """d' of records whose statistics have no spread: the IN and OUT values never overlap, so it is
    +-inf by the sign of the IN-OUT gap (0 where they coincide)."""
    return np.where(gap > 0, np.inf, np.where(gap < 0, -np.inf, 0.0))

def _advantage(dprime: np.ndarray) -> np.ndarray:
    """TPR - FPR of the likelihood-ratio test between two equal-variance Gaussians ``d'`` apart,
    ``2 Phi(d'/2) - 1`` (signed like ``d'``; +-1 at +-inf)."""
    return 2.0 * special.ndtr(np.asarray(dprime, dtype=np.float64) / 2.0) - 1.0


# --------------------------------------------------------------------------------------------
# The scorer
# --------------------------------------------------------------------------------------------


def score(
    phi: np.ndarray,
    member: np.ndarray,
    *,
    method: str = DEFAULT_METHOD,
    alpha: float = 0.05,
    fixed_variance: bool = False,
    offline_mu: float | None = None,
    offline_sigma: float | None = None,
    confidence: float = 0.95,
    delta: float = dp.DEFAULT_DELTA,
    moderated: bool = True,
) -> ScoreResult:
    """Score every record of a batch (DESIGN.md §3).

    Args:
        phi: float ``[n, m]``, statistic of model ``i`` on record ``j`` (finite).
        member: bool ``[n, m]`` (or integers 0/1), ground truth: record ``j`` IN model ``i``.
            Masks need not be balanced; each record needs >= 2 IN and >= 2 OUT models.
        method: one of :data:`METHODS`.
        alpha: level of the one-sided tests of ``offline-*`` and ``rmia`` (per-model FPR target);
            ``online-per-record`` thresholds the likelihood ratio at 0 and ignores it.
        fixed_variance: use one pooled residual std for all records instead of per-record stds
            (Carlini et al.'s "fixed variance", recommended for small n). ``online-per-record``
            pools IN and OUT residuals, ``offline-per-record`` pools OUT residuals only (an
            offline attack models the OUT distribution only). No effect for other methods.
        offline_mu, offline_sigma: the offline Gaussian (:func:`fit_offline_gaussian`); required
            by ``offline-global``, ignored otherwise.
        confidence: level of the interval on each record's score.
        delta: the delta at which each record's ``epsilon`` is reported (``RecordScores``).
        moderated: per-record stds shrunk toward a prior fitted over the batch's records
            (empirical Bayes, :func:`_moderated_sigma`) instead of each record's own; for the
            per-record methods, unless ``fixed_variance``.

    Returns:
        :class:`ScoreResult`. The headline ``score`` with ``score_ci_low``/``score_ci_high``
        is the model-based estimate; the counted ``counted_p`` is ``P_j = TPR_j - FPR_j`` with
        ``TPR_j = #{i IN: member decided} / n_in`` and ``FPR_j = #{i OUT: member decided} / n_out``
        (equal to ``2 * mean_i[LiRA == G] - 1`` for balanced masks), interval by
        :func:`newcombe_interval` with the actual ``n_in``, ``n_out`` (widened, see below).

    Intervals: Newcombe's interval treats the n decisions on a record as independent Bernoulli
    trials. They are not: each is tested against Gaussians fitted on the same record's other
    models, and complementary models err together. On a statistic independent of membership the
    plain interval covers 0 for only ~86% of records with ``online-per-record`` (~80% with
    ``fixed_variance``); with the jackknife widening 96-99%. On real fine-tunes
    (``bench/attacks.py``) the widened interval covers the reference score for 94-98% of records
    (n = 64..16) where Newcombe's alone covers 83-91%. ``offline-global`` (no fitted per-record
    parameters) and ``rmia`` (decision rates near alpha, where Wilson is conservative) keep
    Newcombe's interval, which covers 96-99.6% on the same benchmark. The model-based interval
    covers the reference 93-97% (n = 64..16; part of the shortfall at n = 64 is the reference's
    own noise).

    Raises:
        ValueError: bad shapes or dtypes, NaN/inf in ``phi``, fewer than 4 models, a record with
            fewer than 2 IN or 2 OUT models, zero residual variance, bad settings.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("alpha", alpha), ("confidence", confidence)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    alpha, confidence = float(alpha), float(confidence)
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    delta = float(delta)
    phi, member = _validate(phi, member)
    n, m = phi.shape
    warn = _Warn()

    if method == "offline-global":
        if offline_mu is None or offline_sigma is None:
            raise ValueError("method offline-global needs offline_mu and offline_sigma")
        offline_mu, offline_sigma = float(offline_mu), float(offline_sigma)
        if not np.isfinite(offline_mu):
            raise ValueError(f"offline_mu must be finite, got {offline_mu}")
        if not (np.isfinite(offline_sigma) and offline_sigma > 0):
            raise ValueError(f"offline_sigma must be finite and > 0, got {offline_sigma}")
    elif offline_mu is not None or offline_sigma is not None:
        warn(f"offline_mu/offline_sigma are only used by offline-global; ignored for {method}")
        offline_mu = offline_sigma = None
    if fixed_variance and method in ("offline-global", "rmia"):
        warn(f"fixed_variance has no effect for {method}")
    if n < _FEW_MODELS_WARNING:
        warn(
            f"only {n} models: a single record's score is dominated by binomial noise "
            f"(use n >= {_FEW_MODELS_WARNING}, better >= 64; see the interval)"
        )

    fit = _decide(
        phi, member, method=method, alpha=alpha, fixed_variance=fixed_variance,
        offline_mu=offline_mu, offline_sigma=offline_sigma, warn=warn, moderated=moderated,
    )  # fmt: skip
    g_in, g_out, s_in, s_out = fit.g_in, fit.g_out, fit.s_in, fit.s_out
    test_stat, decisions = fit.test_stat, fit.decisions

    n_in = g_in.count.astype(np.int64)
    n_out = g_out.count.astype(np.int64)
    tp = np.sum(decisions & member, axis=0)
    fp = np.sum(decisions & ~member, axis=0)
    p = tp / n_in - fp / n_out
    ci_low, ci_high = newcombe_interval(tp, n_in, fp, n_out, confidence=confidence)
    rank = _canonical_rank(phi)
    pairs = _complementary_pairs(member, rank)
    if method in _JACKKNIFE_METHODS:
        ci_low, ci_high = _jackknife_widen(
            phi, member, p, ci_low, ci_high, groups=_jackknife_groups(member, pairs, rank),
            confidence=confidence,
            warn=warn, decide=lambda ph, mb: _decide(
                ph, mb, method=method, alpha=alpha, fixed_variance=fixed_variance,
                offline_mu=offline_mu, offline_sigma=offline_sigma, warn=_Warn(), moderated=moderated,
            ).decisions,
        )  # fmt: skip

    # Model-based score: d' = (mu_in - mu_out) / s with s the pooled std of the record's IN and
    # OUT fits as the method uses them (per-record, or one std for all records under
    # fixed_variance), and its interval (:func:`_model_interval`).
    s_pool = np.sqrt(((n_in - 1) * s_in**2 + (n_out - 1) * s_out**2) / (n_in + n_out - 2))
    gap = g_in.mean - g_out.mean
    with np.errstate(divide="ignore", invalid="ignore"):
        dprime = np.where(s_pool > 0, gap / s_pool, _dprime_without_spread(gap))
    pooled_norm = fixed_variance and method == "online-per-record"
    # A moderated std carries its prior's degrees of freedom too (never more than the pool's).
    df_norm = (np.full(m, fit.pooled_dof) if pooled_norm
               else n_in + n_out - 2.0 + min(fit.prior_dof, fit.pooled_dof))
    d_low, d_high = _model_interval(
        phi, member, g_in, g_out, s_pool, df_norm, pooled_std=fit.pooled_all, pairs=pairs,
        confidence=confidence,
    )  # fmt: skip
    # The same d' in DP units (ftps.privacy.dp): mu = |d'| and epsilon at the chosen delta, both
    # increasing in |d'|, so the interval maps through.
    mu = dp.mu_from_dprime(dprime)
    mu_low, mu_high = dp.mu_interval(d_low, d_high)

    records = RecordScores(
        score=_advantage(dprime),
        score_ci_low=_advantage(d_low),
        score_ci_high=_advantage(d_high),
        counted_p=p,
        counted_p_ci_low=ci_low,
        counted_p_ci_high=ci_high,
        n_in=n_in,
        n_out=n_out,
        auc=per_record_auc(phi, member),
        mu_in=g_in.mean,
        sigma_in=np.asarray(s_in, dtype=np.float64),
        mu_out=g_out.mean,
        sigma_out=np.asarray(s_out, dtype=np.float64),
        empirical_mu=mu,
        empirical_mu_ci_low=mu_low,
        empirical_mu_ci_high=mu_high,
        empirical_epsilon=dp.epsilon_at_delta(mu, delta),
        empirical_epsilon_ci_low=dp.epsilon_at_delta(mu_low, delta),
        empirical_epsilon_ci_high=dp.epsilon_at_delta(mu_high, delta),
    )
    fpr, tpr = roc_curve(test_stat, member)
    batch = BatchMetrics(
        auc=float(np.trapezoid(tpr, fpr)),
        tpr_at_1pct_fpr=_tpr_at_fpr(fpr, tpr, 0.01),
        tpr_at_0_1pct_fpr=_tpr_at_fpr(fpr, tpr, 0.001),
        fpr=fpr,
        tpr=tpr,
    )
    n_neg = int(n * m - member.sum())
    if n_neg < 1000:
        which = "TPR at 0.1% FPR" if n_neg >= 100 else "TPR at 1% and at 0.1% FPR"
        warn(
            f"only {n_neg} OUT (model, record) pairs: {which} is not resolved (fewer than one "
            "false positive at that rate); read it as TPR at the lowest FPR reached"
        )
    if method != "online-per-record" and not decisions.any():
        warn(
            f"the attack never decided 'member' (alpha={alpha:g}): every record scores 0, which "
            "says the threshold is too strict, not that the records are safe"
        )
    return ScoreResult(
        method=method,
        n_models=n,
        n_records=m,
        records=records,
        batch=batch,
        decisions=decisions,
        test_stat=test_stat,
        warnings=list(warn.messages),
        alpha=alpha,
        confidence=confidence,
        fixed_variance=bool(fixed_variance),
        offline_mu=offline_mu,
        offline_sigma=offline_sigma,
        delta=delta,
    )


def score_groups(phi: np.ndarray, member: np.ndarray, groups: np.ndarray, *,
                 delta: float = dp.DEFAULT_DELTA, confidence: float = 0.95) -> ScoreResult:
    """Score whole groups of records (a contributor's contribution: user-level membership
    inference) from masks that draw each group in or out together (``masks.make_group_masks``).

    A group's statistic on a model is the mean of its records' statistics (records whose
    statistic is not finite left out); the groups are then scored as records are, by online
    LiRA (:func:`score`). Returns a ScoreResult over the groups, ``0..G-1`` in order.
    Raises ValueError when a group's records do not share one mask column.
    """
    phi = np.asarray(phi, dtype=np.float64)
    member = np.asarray(member).astype(bool)
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    first = np.array([int(np.argmax(groups == g)) for g in range(n_groups)])
    if (member != member[:, first[groups]]).any():
        raise ValueError("a group's records must be in or out of each model together (group masks)")
    finite = np.isfinite(phi)
    sums = np.zeros((phi.shape[0], n_groups))
    counts = np.zeros((phi.shape[0], n_groups))
    np.add.at(sums.T, groups, np.where(finite, phi, 0.0).T)
    np.add.at(counts.T, groups, finite.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        grouped = sums / counts
    return score(grouped, member[:, first], method="online-per-record", delta=delta, confidence=confidence)
