"""PNG plots of a :class:`~ftps.privacy.scoring.ScoreResult` (matplotlib, Agg canvas).

Figures are built with ``matplotlib.figure.Figure`` and an explicit Agg canvas rather than
``pyplot``: no global backend or figure registry, so it is safe inside a server thread.
Every function returns the PNG bytes and, given ``path``, also writes them there.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from ftps.privacy.scoring import ScoreResult, online_threshold

__all__ = ["roc_png", "roc_curves_png", "score_hist_png", "scores_with_intervals_png", "record_diagnosis_png"]


def _render(fig: Figure, path: str | Path | None) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def roc_png(result: ScoreResult, path: str | Path | None = None) -> bytes:
    """Log-log ROC of the attack over all (model, record) pairs (Carlini et al. S&P'22 style),
    with the chance diagonal and the AUC / TPR@1%FPR / TPR@0.1%FPR in the legend."""
    b = result.batch
    return roc_curves_png(
        [(_roc_label(result.method, b.auc, b.tpr_at_1pct_fpr, b.tpr_at_0_1pct_fpr), b.fpr, b.tpr)],
        title=f"Membership inference ROC (n={result.n_models}, m={result.n_records})", path=path)


def _roc_label(method: str, auc: float, tpr1: float, tpr01: float) -> str:
    return f"{method}  AUC={auc:.3f}\nTPR@1%FPR={tpr1:.3f}  TPR@0.1%FPR={tpr01:.3f}"


def roc_curves_png(curves: list[tuple[str, np.ndarray, np.ndarray]], *, title: str,
                   path: str | Path | None = None) -> bytes:
    """Log-log ROC curves ``(label, fpr, tpr)`` on one axis, with the chance diagonal."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    lo = 1e-2
    for label, fpr, tpr in curves:
        fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
        keep = (fpr > 0) & (tpr > 0)
        ax.plot(fpr[keep], tpr[keep], lw=1.5, label=label)
        # Smallest non-zero rate on the curve (1 / #negatives at best), so every point is visible.
        lo = min(lo, fpr[keep].min(initial=1.0), tpr[keep].min(initial=1.0))
    lo = max(lo / 2, 1e-6)
    ax.plot([lo, 1], [lo, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _render(fig, path)


def scores_with_intervals_png(score: np.ndarray, ci_low: np.ndarray, ci_high: np.ndarray, *, title: str,
                              path: str | Path | None = None, what: str = "privacy score") -> bytes:
    """Left: histogram of per-record scores. Right: every record's score with its interval,
    sorted by score, so the records whose whole interval sits above 0 stand out. ``what`` names
    the score on the axes (e.g. "model-based score" for the headline ``score``, "counted P" for
    ``counted_p``); ``ci_low``/``ci_high`` are that score's interval bounds."""
    score, ci_low, ci_high = (np.asarray(a, float) for a in (score, ci_low, ci_high))
    order = np.argsort(score)
    fig = Figure(figsize=(10, 4))
    ax, ax2 = fig.subplots(1, 2)
    ax.hist(score, bins=np.linspace(-1, 1, 41), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_xlabel(f"{what} (0 = coin flip, 1 = always identified)")
    ax.set_ylabel("records")
    ax.set_title("score histogram", fontsize=9)
    rank = np.arange(len(score))
    above = ci_low[order] > 0
    ax2.vlines(rank, ci_low[order], ci_high[order], color=np.where(above, "tab:red", "lightgrey"), lw=1)
    ax2.plot(rank, score[order], ".", ms=3, color="black")
    ax2.axhline(0, color="grey", lw=1, ls="--")
    ax2.set_xlabel("records, sorted by score")
    ax2.set_ylabel(f"{what} with 95% interval")
    ax2.set_title(f"{int(above.sum())} of {len(score)} records with the interval above 0 (red)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _render(fig, path)


def score_hist_png(result: ScoreResult, path: str | Path | None = None) -> bytes:
    """Histogram of the per-record privacy scores: the model-based estimate (the headline) and
    the counted ``P``."""
    r = result.records
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = np.linspace(-1, 1, 41)
    ax.hist(r.score, bins=bins, alpha=0.7, label="2 Phi(d'/2) - 1 (model-based, headline)")
    ax.hist(r.counted_p, bins=bins, alpha=0.5, label="P = TPR - FPR (counted)")
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_xlabel("privacy score (0 = coin flip, 1 = always identified)")
    ax.set_ylabel("records")
    ax.set_title(f"Per-record scores, {result.method} (n={result.n_models}, m={result.n_records})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _render(fig, path)


def _thresholds(result: ScoreResult, j: int) -> tuple[list[float], str]:
    r = result.records
    z = float(stats.norm.isf(result.alpha))
    if result.method == "offline-global":
        return [result.offline_mu + z * result.offline_sigma], f"p < {result.alpha:g}"
    if result.method == "offline-per-record":
        return [float(r.mu_out[j] + z * r.sigma_out[j])], f"p < {result.alpha:g}"
    if result.method == "online-per-record":
        roots = online_threshold(
            float(r.mu_in[j]), float(r.sigma_in[j]), float(r.mu_out[j]), float(r.sigma_out[j])
        )
        return roots, "LLR = 0"
    return [], ""  # rmia thresholds a rank among other records, not phi


def record_diagnosis_png(
    result: ScoreResult,
    phi: np.ndarray,
    member: np.ndarray,
    j: int,
    path: str | Path | None = None,
) -> bytes:
    """Diagnosis of record ``j``: its IN and OUT statistics (``phi[:, j]`` split by
    ``member[:, j]``, arrays ``[n, m]``), the fitted IN/OUT Gaussians (full fits, no
    leave-one-out) and the decision threshold of the method (for ``offline-global`` the offline
    Gaussian too). The title carries the record's model-based score (the headline) and counted P,
    each with its interval, and its AUC."""
    phi = np.asarray(phi, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    if not 0 <= j < result.n_records:
        raise ValueError(f"record index {j} out of range [0, {result.n_records})")
    r = result.records
    x_in, x_out = phi[member[:, j], j], phi[~member[:, j], j]
    gaussians = [
        ("IN fit", float(r.mu_in[j]), float(r.sigma_in[j]), "tab:red"),
        ("OUT fit", float(r.mu_out[j]), float(r.sigma_out[j]), "tab:blue"),
    ]
    if result.method == "offline-global":
        gaussians.append(("offline Gaussian", result.offline_mu, result.offline_sigma, "black"))
    gaussians = [g for g in gaussians if g[2] > 0]  # zero-variance fits cannot be drawn
    lo = min([phi[:, j].min(), *(mu - 4 * s for _, mu, s, _ in gaussians)])
    hi = max([phi[:, j].max(), *(mu + 4 * s for _, mu, s, _ in gaussians)])
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    grid = np.linspace(lo, hi, 400)

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = np.linspace(lo, hi, 31)
    for x, colour, name in ((x_out, "tab:blue", "OUT"), (x_in, "tab:red", "IN")):
        label = f"{name} phi (n={x.size})"
        ax.hist(x, bins=bins, density=True, alpha=0.4, color=colour, label=label)
    for name, mu, s, colour in gaussians:
        ls = ":" if name == "offline Gaussian" else "-"
        ax.plot(grid, stats.norm.pdf(grid, mu, s), color=colour, ls=ls, label=name)
    thresholds, what = _thresholds(result, j)
    for k, t in enumerate(t for t in thresholds if lo <= t <= hi):
        ax.axvline(t, color="black", ls="--", lw=1, label=f"threshold ({what})" if k == 0 else None)
    ax.set_xlabel("phi = log(p_y / (1 - p_y))")
    ax.set_ylabel("density")
    ax.set_title(
        f"record {j} ({result.method}): score={r.score[j]:+.2f} "
        f"[{r.score_ci_low[j]:+.2f}, {r.score_ci_high[j]:+.2f}]\n"
        f"counted P={r.counted_p[j]:+.2f} [{r.counted_p_ci_low[j]:+.2f}, {r.counted_p_ci_high[j]:+.2f}], "
        f"AUC={r.auc[j]:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _render(fig, path)
