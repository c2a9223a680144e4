"""Small PNG helpers for the client reports that work from what the API returns.

The service's plots (``ftps.privacy.plots``) need the statistic matrix; a contributor and a
builder only get each record's fitted IN/OUT Gaussians (``RecordScore.mu_in`` ... ``sigma_out``), so
the diagnosis plot here draws those, in the same style: IN red, OUT blue, the method's threshold
dashed black. Figures use an explicit Agg canvas (no pyplot state).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from ftps.privacy.scoring import online_threshold

__all__ = ["DecisionRule", "decision_rule", "fitted_rates", "diagnosis_png", "thumbnail_png", "unusual_png",
           "comparison_png"]


@dataclass(frozen=True)
class DecisionRule:
    """Where a method says "member" on the phi axis: at ``thresholds`` the decision flips;
    ``says_member`` is the vectorised rule; ``label`` names the test for the legend."""

    thresholds: list[float]
    says_member: Callable[[np.ndarray], np.ndarray]
    label: str


def _ok(*sigmas: float) -> bool:
    return all(math.isfinite(s) and s > 0 for s in sigmas)


def decision_rule(method: str, *, mu_in: float, sigma_in: float, mu_out: float, sigma_out: float,
                  alpha: float = 0.05, offline: tuple[float, float] | None = None) -> DecisionRule | None:
    """The method's decision on one record's phi, from its fitted Gaussians (full fits; the scores
    themselves use leave-one-model-out fits, so this is the plot's approximation of the rule).
    ``None`` where it cannot be drawn: rmia (it thresholds a rank, not phi), offline-global without
    the offline Gaussian, or a degenerate fit."""
    z = float(stats.norm.isf(alpha))
    if method == "online-per-record":
        if not _ok(sigma_in, sigma_out):
            return None
        roots = online_threshold(mu_in, sigma_in, mu_out, sigma_out)

        def llr_positive(x: np.ndarray) -> np.ndarray:
            return stats.norm.logpdf(x, mu_in, sigma_in) > stats.norm.logpdf(x, mu_out, sigma_out)

        return DecisionRule(roots, llr_positive, "likelihood ratio = 1")
    if method == "offline-per-record":
        if not _ok(sigma_out):
            return None
        t = mu_out + z * sigma_out
        return DecisionRule([t], lambda x: np.asarray(x) > t, f"OUT p-value = {alpha:g}")
    if method == "offline-global" and offline is not None and _ok(offline[1]):
        t = offline[0] + z * offline[1]
        return DecisionRule([t], lambda x: np.asarray(x) > t, f"offline Gaussian p-value = {alpha:g}")
    return None


def fitted_rates(rule: DecisionRule, *, mu_in: float, sigma_in: float, mu_out: float,
                 sigma_out: float) -> tuple[float, float]:
    """(TPR, FPR) of ``rule`` if phi followed the fitted IN / OUT Gaussians exactly: the mass of
    each Gaussian where the rule says member. Their difference is a model-based P."""
    cuts = [-np.inf, *sorted(rule.thresholds), np.inf]
    tpr = fpr = 0.0
    for a, b in zip(cuts[:-1], cuts[1:]):
        probe = (a + b) / 2 if np.isfinite(a) and np.isfinite(b) else (b - 1.0 if np.isfinite(b) else a + 1.0)
        if not np.isfinite(probe):  # no thresholds: one region, the whole axis
            probe = mu_in
        if bool(rule.says_member(np.array([probe]))[0]):
            tpr += _mass(a, b, mu_in, sigma_in)
            fpr += _mass(a, b, mu_out, sigma_out)
    return tpr, fpr


def _mass(a: float, b: float, mu: float, sigma: float) -> float:
    if not _ok(sigma):
        return float(a < mu <= b)
    return float(stats.norm.cdf(b, mu, sigma) - stats.norm.cdf(a, mu, sigma))


def _render(fig: Figure, path: str | Path | None, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def record_diagnosis_png(s, *, alpha: float, offline: tuple[float, float] | None,
                         offline_hidden: bool = False, path: str | Path | None = None) -> bytes:
    """The diagnosis plot of one ``RecordScore`` as the reports and the web client show it: titled
    with its headline score, interval and counted P. ``offline_hidden``: the viewer may not see the
    task's offline Gaussian (a contributor), which the offline-global threshold needs."""
    from clients.score_html import headline, method_name

    method = method_name(s.method)
    h = headline(s)
    note = ""
    if method == "offline-global" and offline is None and offline_hidden:
        note = "threshold: the task's offline Gaussian (builder only)"
    return diagnosis_png(
        mu_in=s.mu_in, sigma_in=s.sigma_in, mu_out=s.mu_out, sigma_out=s.sigma_out, method=method,
        alpha=alpha, offline=offline, note=note, path=path,
        title=f"score {h[0]:+.2f} [{h[1]:+.2f}, {h[2]:+.2f}] · counted P {s.counted_p:+.2f} · {method}")


def diagnosis_png(*, mu_in: float, sigma_in: float, mu_out: float, sigma_out: float, method: str,
                  title: str, alpha: float = 0.05, offline: tuple[float, float] | None = None,
                  note: str = "", path: str | Path | None = None) -> bytes:
    """One record's IN and OUT Gaussians of phi (fitted on the models that did / did not train on
    it), the method's threshold and, shaded, where the attack says "member". The closer and wider
    the two curves, the safer the record. 560 x 270 pixels; the legend sits right of the axes."""
    fits = [(n, mu, s, c) for n, mu, s, c in (("IN", mu_in, sigma_in, "tab:red"),
                                              ("OUT", mu_out, sigma_out, "tab:blue")) if math.isfinite(mu)]
    spread = max([s for _, _, s, _ in fits if _ok(s)] or [1.0])
    lo = min([mu - 3.5 * (s if _ok(s) else spread) for _, mu, s, _ in fits] or [-1.0])
    hi = max([mu + 3.5 * (s if _ok(s) else spread) for _, mu, s, _ in fits] or [1.0])
    rule = decision_rule(method, mu_in=mu_in, sigma_in=sigma_in, mu_out=mu_out, sigma_out=sigma_out,
                         alpha=alpha, offline=offline)
    off_plot = []
    if rule is not None:
        width = hi - lo
        for t in rule.thresholds:  # widen a little for a nearby threshold; name a far one instead
            if lo - 0.2 * width <= t <= hi + 0.2 * width:
                lo, hi = min(lo, t - 0.03 * width), max(hi, t + 0.03 * width)
            else:
                off_plot.append(t)
    grid = np.linspace(lo, hi, 600)

    fig = Figure(figsize=(5.6, 2.7))
    fig.subplots_adjust(left=0.09, right=0.63, bottom=0.17, top=0.88)
    ax = fig.add_subplot()
    peaks = [float(stats.norm.pdf(0.0, 0.0, s)) for _, _, s, _ in fits if _ok(s)] or [1.0]
    # A very narrow curve would flatten the other to a line: clip its peak, keep both visible.
    peak = min(max(peaks), 3 * min(peaks))
    if rule is not None:
        ax.fill_between(grid, 0, 1, where=rule.says_member(grid), transform=ax.get_xaxis_transform(),
                        color="0.90", lw=0, label="attack says member")
    for name, mu, s, colour in fits:
        if _ok(s):
            pdf = stats.norm.pdf(grid, mu, s)
            ax.plot(grid, pdf, color=colour, lw=1.6, label=f"{name} models: N({mu:.2f}, {s:.2f}²)")
            ax.fill_between(grid, pdf, color=colour, alpha=0.12, lw=0)
        else:  # every model gave the same phi: a spike, not a curve
            ax.axvline(mu, color=colour, lw=2, label=f"{name} models: all phi = {mu:.2f}")
    lines = []
    if rule is not None:
        for k, t in enumerate(t for t in rule.thresholds if t not in off_plot):
            ax.axvline(t, color="black", ls="--", lw=1, label=f"threshold ({rule.label})" if k == 0 else None)
        tpr, fpr = fitted_rates(rule, mu_in=mu_in, sigma_in=sigma_in, mu_out=mu_out, sigma_out=sigma_out)
        lines.append(f"on the fitted curves the attack\nsays member for {tpr:.0%} of IN\n"
                     f"models, {fpr:.0%} of OUT models")
        if off_plot:
            lines.append("\nalso a threshold at phi = " + ", ".join(f"{t:.1f}" for t in off_plot) + "\n(off the plot)")
    else:
        lines.append(note or "no phi threshold to draw\nfor this method")
    if note and rule is not None:
        lines.append(note)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, peak * 1.12)
    ax.set_xlabel("phi = log(p_y / (1 - p_y)) on this record", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0)
    fig.text(0.655, 0.17, "\n".join(lines), fontsize=7, va="bottom", color="0.25", linespacing=1.3)
    return _render(fig, path)


def thumbnail_png(record: np.ndarray, path: str | Path | None = None, *, target: int = 72) -> bytes | None:
    """A record [C, H, W] in [0, 1] (C = 1 or 3) as a PNG about ``target`` pixels wide, enlarged
    by an integer factor with nearest-neighbour so pixels stay sharp; ``None`` if not an image."""
    from PIL import Image

    from ftps.records.images import is_image_shape, to_uint8_image

    record = np.asarray(record)
    if not is_image_shape(record.shape):
        return None
    img = Image.fromarray(to_uint8_image(record))
    factor = max(1, round(target / max(img.size)))
    if factor > 1:
        img = img.resize((img.size[0] * factor, img.size[1] * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def unusual_png(unusual: list[dict], path: str | Path | None = None, *, title: str = "") -> bytes | None:
    """Horizontal bars of a tabular row's most unusual numeric columns (``Schema.unusual``'s
    entries): their z-scores against the builder's data, most unusual on top, |z| >= 2 in red;
    ``None`` when none of them is numeric."""
    numeric = [u for u in unusual if u["z"] is not None]
    if not numeric:
        return None
    fig = Figure(figsize=(3.6, 0.5 + 0.3 * len(numeric)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    z = np.array([u["z"] for u in numeric][::-1], dtype=float)
    names = [f"{u['feature'][:28]} = {u['value']}" for u in numeric][::-1]
    ax.barh(np.arange(len(z)), z, color=["tab:red" if abs(v) >= 2 else "tab:blue" for v in z], height=0.6)
    ax.set_yticks(np.arange(len(z)), names, fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    for v in (-2, 2):
        ax.axvline(v, color="0.6", ls=":", lw=0.8)
    lim = max(2.5, float(np.abs(z).max()) * 1.1)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("z-score against the builder's data", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _render(fig, path)


def comparison_png(rows: list[dict], path: str | Path | None = None, *, title: str = "") -> bytes | None:
    """Risk against utility of a recipe comparison: one labelled point per DONE recipe
    (``score_html.recipe_rows``), x its held-out accuracy, y its mean score (left) and its records
    identifiable above chance (right). Down and to the right is better. ``None``: no recipe is DONE."""
    done = [r for r in rows if r["done"]]
    if not done:
        return None
    fig = Figure(figsize=(9.0, 3.8))
    FigureCanvasAgg(fig)
    x = np.array([r["heldout_accuracy"] for r in done], dtype=float)
    for k, (key, label) in enumerate((("mean_score", "mean score (headline)"),
                                      ("above_chance", "records above chance"))):
        ax = fig.add_subplot(1, 2, k + 1)
        y = np.array([r[key] for r in done], dtype=float)
        colors = ["tab:blue" if r["name"] == "current" else "tab:orange" for r in done]
        ax.scatter(x, y, c=colors, s=40, zorder=3)
        for r, xi, yi in zip(done, x, y):
            ax.annotate(r["name"], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
        # Room for the labels, and a visible span when the recipes tie.
        pad_x = max(0.02, float(np.ptp(x)) * 0.25)
        pad_y = max(0.05 if key == "mean_score" else 1.0, float(np.ptp(y)) * 0.25)
        ax.set_xlim(float(x.min()) - pad_x, float(x.max()) + pad_x)
        if key == "above_chance":  # a count: whole numbers, none below 0
            ax.set_ylim(max(-0.5, float(y.min()) - pad_y), float(y.max()) + pad_y)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_ylim(float(y.min()) - pad_y, float(y.max()) + pad_y)
        ax.set_xlabel("held-out accuracy", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _render(fig, path)
