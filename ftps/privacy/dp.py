"""A record's measured exposure in differential-privacy units (pure numpy/scipy).

Gaussian differential privacy (Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022): a
mechanism is mu-GDP when telling "record in" from "record out" is no easier than telling N(0, 1) from
N(mu, 1). The largest TPR - FPR any test reaches against a mu-GDP mechanism is ``2 Phi(mu/2) - 1``,
which is exactly the headline score ``2 Phi(d'/2) - 1`` (:mod:`ftps.privacy.scoring`) with
``mu = |d'|``: the record's fitted IN and OUT Gaussians are the two hypotheses, and the likelihood-ratio
test between them is as good in either direction, so a record whose IN statistics sit *below* its OUT
ones is as distinguishable as the mirror case.

mu-GDP is (epsilon, delta)-DP for every epsilon >= 0 with (their Corollary 2.13)::

    delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2)

so at a chosen delta the record's epsilon is the root of that equation (:func:`epsilon_at_delta`).

What these numbers are: the exposure *this attack measured* on this batch, an empirical lower-bound
style estimate with sampling error, not a guarantee. A stronger attack could measure more; the
interval is about the estimate of this attack's d', not about all attacks.
"""

from __future__ import annotations

import numpy as np
from scipy import special

__all__ = ["DEFAULT_DELTA", "delta_at_epsilon", "epsilon_at_delta", "mu_from_dprime", "mu_interval"]

# The delta privacy engineers quote for data sets of 10^4-10^5 people (well below 1/N).
DEFAULT_DELTA = 1e-5
# Bisection steps: the bracket [0, hi] shrinks by 2^-_STEPS, far below float64 resolution of epsilon.
_STEPS = 200


def mu_from_dprime(dprime: np.ndarray) -> np.ndarray:
    """The GDP ``mu`` a record's d' measures: ``|d'|`` (see the module docstring)."""
    return np.abs(np.asarray(dprime, dtype=np.float64))


def mu_interval(d_low: np.ndarray, d_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval of ``|d'|`` given an interval ``[d_low, d_high]`` of ``d'``.

    Wherever the d' interval covers the true d', this one covers its absolute value: it is the image
    of ``[d_low, d_high]`` under ``abs`` (from 0 when the interval straddles 0)."""
    lo, hi = np.asarray(d_low, dtype=np.float64), np.asarray(d_high, dtype=np.float64)
    straddle = (lo <= 0) & (hi >= 0)
    low = np.where(straddle, 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    high = np.maximum(np.abs(lo), np.abs(hi))
    return low, high


def delta_at_epsilon(mu: np.ndarray | float, epsilon: np.ndarray | float) -> np.ndarray:
    """``delta(epsilon)`` of a mu-GDP mechanism (the module docstring's formula), vectorised.

    The second term is computed as ``exp(epsilon + log Phi(.))`` so that a large epsilon does not
    overflow ``e^epsilon`` before the tiny tail probability brings it back down."""
    mu, eps = np.broadcast_arrays(np.asarray(mu, dtype=np.float64), np.asarray(epsilon, dtype=np.float64))
    out = np.zeros(mu.shape)
    pos = mu > 0
    finite = pos & np.isfinite(mu)
    m, e = mu[finite], eps[finite]
    out[finite] = special.ndtr(-e / m + m / 2.0) - np.exp(e + special.log_ndtr(-e / m - m / 2.0))
    out[pos & ~np.isfinite(mu)] = 1.0  # perfectly separable: no epsilon helps
    return np.clip(out, 0.0, 1.0)


def epsilon_at_delta(mu: np.ndarray | float, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """The smallest ``epsilon >= 0`` with ``delta(epsilon) <= delta`` for a mu-GDP mechanism.

    ``mu = 0`` gives 0 (nothing measured), ``mu = inf`` gives inf (the IN and OUT statistics never
    overlapped). ``delta(epsilon)`` decreases in epsilon, so a bracketing bisection finds the root; the
    bracket's top ``mu^2/2 + mu z_{1-delta}`` already makes the first term alone at most delta."""
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    mu = np.asarray(mu, dtype=np.float64)
    if np.any(np.isnan(mu)) or np.any(mu < 0):
        raise ValueError("mu must be >= 0 and not NaN")
    flat = mu.ravel()
    eps = np.zeros(flat.shape)
    eps[np.isinf(flat)] = np.inf
    # Far out (mu in the thousands: IN and OUT thousands of standard deviations apart) the root sits
    # at the bracket's top to within its rounding, and e^epsilon would overflow: take the top.
    huge = np.isfinite(flat) & (flat > 1e3)
    with np.errstate(over="ignore"):
        eps[huge] = flat[huge] * flat[huge] / 2.0 + flat[huge] * special.ndtri(1.0 - delta)
    todo = np.isfinite(flat) & ~huge & (delta_at_epsilon(flat, 0.0) > delta)
    m = flat[todo]
    lo = np.zeros(m.shape)
    hi = m * m / 2.0 + m * special.ndtri(1.0 - delta) + 1e-12
    for _ in range(_STEPS):
        mid = (lo + hi) / 2.0
        above = delta_at_epsilon(m, mid) > delta
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
        if np.all(hi - lo <= 1e-13 * np.maximum(hi, 1.0)):
            break
    eps[todo] = hi
    return eps.reshape(mu.shape)
