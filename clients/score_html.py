"""HTML of per-record privacy scores, one renderer for the HTML reports (``clients/reports.py``)
and the web client's pages (``clients/web/pages.py``): the headline score with its 95% interval,
the one-line reading, the risk badge, the record card, the summary sentence, the stat cards, the
"how to read" text, the table of methods and the table of every record.

The headline of a record is its model-based score 2Φ(d′/2) − 1 from the IN and OUT Gaussians
fitted over the round's models, with its 95% interval (``RecordScore.score``,
``score_ci_low``, ``score_ci_high``): steadier than the paper's counted P = TPR − FPR
(``counted_p``, ``counted_p_ci_low``, ``counted_p_ci_high``), which is shown next to it. Rounds scored before the
model-based interval existed fall back to P. Beside them, the same exposure in DP units: the empirical
epsilon at the task's delta and Gaussian-DP mu (``empirical_epsilon``, ``empirical_mu``; ``—`` for
scores stored before those existed).

Plain functions over protobuf messages returning strings; every value is escaped. No inline
style or script (the web client's Content-Security-Policy forbids both): the classes used here
are styled by :data:`SCORE_CSS` and :data:`BADGE_CSS`, which both stylesheets include, and by
each one's own ``.record``, ``.card`` and table rules.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np

from ftps.common import serde
from ftps.records.tabular import Schema
from ftps.v1 import common_pb2

__all__ = ["SCORE_CSS", "BADGE_CSS", "TABLE_CSS", "LEVEL_FILL", "FEW_MODELS", "TOP_RISK", "e", "method_name", "safe_name",
           "anchor_id", "reading", "risk_level", "interval_svg", "headline", "rank_key", "record_reading",
           "badge", "epsilon_cell", "epsilon_text", "mu_text", "dp_facts", "dp_training_note", "contributor_summary",
           "summary_line", "contributors_table", "card", "summary_sentence", "stat_cards", "how_to_read", "record_card", "method_table",
           "records_table", "raw_row", "tabular_html", "contributions_table", "recipe_rows", "comparison_done",
           "comparison_table", "exposed_everywhere_html"]

FEW_MODELS = 16  # below this a single record's score is mostly binomial noise (DESIGN.md section 3)
TOP_RISK = 10
# An interval that includes 0 but reaches this high does not show the record is safe: say so.
WIDE = 0.25

# Score, thumbnail, risk-badge and score-table styles: in the reports' stylesheet and the web client's
# (clients/web/static.py).
SCORE_CSS = """.score{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums}
.ci{color:#5b6475;font-size:14px;margin-left:6px;font-variant-numeric:tabular-nums}
.thumb{width:72px;height:72px;border:1px solid #d5d9e0;image-rendering:pixelated;background:#fff}
.nothumb{width:72px;height:72px;border:1px dashed #c9ced8;color:#8a92a3;font-size:11px;display:flex;
align-items:center;justify-content:center;text-align:center}
td .minor{display:block;color:#5b6475;font-size:12px;font-weight:400}
td.rid{white-space:nowrap}td.reading{font-size:13px;min-width:220px}
.tabrow{margin-top:8px;font-size:13px;overflow-x:auto}.tabrow table{width:auto;font-size:12px}
.tabrow th,.tabrow td{padding:2px 8px}.tabrow p{color:#5b6475;margin:2px 0 4px}.tabrow h4{margin:6px 0 2px;font-size:13px}
.rowvals{max-height:220px;overflow:auto;display:inline-block}
"""
BADGE_CSS = """.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600;
vertical-align:middle;white-space:nowrap}
.high{background:#fbd9d6;color:#9b1209}.elevated{background:#ffedc9;color:#7d4a00}
.chance{background:#e3f2e7;color:#1d6532}.below{background:#e6ebf5;color:#34496e}
.uncertain{background:#eceef2;color:#4a5263}
"""
TABLE_CSS = """table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e1e4ea;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:middle}
th{background:#f0f2f5;font-weight:600;font-size:13px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.headline td{font-weight:600}
img{max-width:100%;height:auto}
"""
LEVEL_FILL = {"high": "#c0392b", "elevated": "#d68910", "chance": "#5d9c6b", "below": "#5a6f99", "uncertain": "#8a92a3"}


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def method_name(m: int) -> str:
    return serde.METHOD_NAMES.get(m, "?")


def safe_name(name: str) -> str:
    """A file name or HTML id from a record id (ids are validated by the service; this keeps it so)."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return s[:80] or "record"


def anchor_id(record_id: str) -> str:
    """The id of a record's card, which the summary sentence links to."""
    return f"r-{safe_name(record_id)}"


# -- words --------------------------------------------------------------------------------------

def _pct(v: float) -> str:
    return f"{abs(round(100 * v))}%"


def _signed_pct(v: float) -> str:
    sign = "+" if v > 0 else "−" if v < 0 else ""
    if 0 < abs(v) < 0.005:  # "0%" would hide which side of 0 a bound is on
        return f"{sign}{abs(100 * v):.1f}%"
    return f"{sign if round(100 * v) else ''}{abs(round(100 * v))}%"


def reading(score: float, ci_low: float, ci_high: float, *, n_models: int = 0) -> str:
    """One plain-language line for a score with its 95% interval [ci_low, ci_high]."""
    interval = f"95% interval {_signed_pct(ci_low)} to {_signed_pct(ci_high)}"
    if ci_low > 0:
        return (f"An attacker who can train models like this one identifies this record's membership "
                f"{_pct(score)} more often than chance ({interval}).")
    if ci_high < 0:
        return (f"No measured risk: the attack does worse than chance on this record ({interval}, all below 0); "
                "that is a quirk of this attack on this record, not a protection.")
    line = f"No better than chance (the interval includes 0: {interval})"
    if ci_high >= WIDE:
        models = f"{n_models} models" if n_models else "this few models"
        return f"{line}; but the interval is wide: up to {_pct(ci_high)} is not ruled out with {models}."
    return f"{line}."


def risk_level(ci_low: float, ci_high: float) -> tuple[str, str]:
    """(css class, label) of a record by where its whole interval lies."""
    if ci_low >= 0.5:
        return "high", "high risk"
    if ci_low > 0:
        return "elevated", "identifiable"
    if ci_high < 0:
        return "below", "below chance"
    if ci_high >= WIDE:
        return "uncertain", "uncertain"
    return "chance", "not above chance"


def interval_svg(score: float, lo: float, hi: float, *, width: int = 190) -> str:
    """The score (dot) and its interval (bar) on the [-1, 1] axis, 0 marked: no script, no image file."""
    def x(v: float) -> float:
        return 8 + (min(max(v, -1.0), 1.0) + 1) / 2 * (width - 16)

    cls, _ = risk_level(lo, hi)
    return (f'<svg class="iv" width="{width}" height="26" viewBox="0 0 {width} 26" role="img" '
            f'aria-label="score {score:+.2f}, interval {lo:+.2f} to {hi:+.2f}">'
            f'<line x1="{x(-1):.1f}" y1="10" x2="{x(1):.1f}" y2="10" stroke="#c5cad3" stroke-width="2"/>'
            f'<line x1="{x(0):.1f}" y1="3" x2="{x(0):.1f}" y2="17" stroke="#7a8294" stroke-dasharray="2,2"/>'
            f'<rect x="{x(lo):.1f}" y="6" width="{max(x(hi) - x(lo), 2):.1f}" height="8" rx="3" '
            f'fill="{LEVEL_FILL[cls]}" opacity="0.55"/>'
            f'<circle cx="{x(score):.1f}" cy="10" r="4" fill="#1d2330"/>'
            f'<text x="{x(-1):.1f}" y="25" font-size="9" fill="#7a8294">−1</text>'
            f'<text x="{x(0) - 2:.1f}" y="25" font-size="9" fill="#7a8294">0</text>'
            f'<text x="{x(1) - 8:.1f}" y="25" font-size="9" fill="#7a8294">+1</text></svg>')


# -- a record's headline ------------------------------------------------------------------------

def headline(s: common_pb2.RecordScore) -> tuple[float, float, float]:
    """(score, 95% low, 95% high) of the record's headline: the model-based 2Φ(d′/2) − 1, steadier
    than the counted P. Rounds scored before the model-based score carried an interval fall back to P."""
    if s.score_ci_low == s.score_ci_high == 0.0 and (s.counted_p_ci_low or s.counted_p_ci_high):
        return s.counted_p, s.counted_p_ci_low, s.counted_p_ci_high
    return s.score, s.score_ci_low, s.score_ci_high


def rank_key(s: common_pb2.RecordScore) -> tuple:
    """Sort key: highest headline first, then the higher lower bound, then the id."""
    h = headline(s)
    return (-h[0], -h[1], s.record_id)


def record_reading(s: common_pb2.RecordScore) -> str:
    """The plain-language reading of the record's headline score."""
    return reading(*headline(s), n_models=s.n_in + s.n_out)


def badge(s: common_pb2.RecordScore) -> str:
    cls, label = risk_level(*headline(s)[1:])
    return f'<span class="badge {cls}">{e(label)}</span>'


def _interval(lo: float, hi: float) -> str:
    return f"[{lo:+.2f}, {hi:+.2f}]"


def _counted(s: common_pb2.RecordScore) -> str:
    return f"counted P {s.counted_p:+.2f} {_interval(s.counted_p_ci_low, s.counted_p_ci_high)}"


# -- the same exposure in DP units (ftps.privacy.dp) ---------------------------------------------

def _num(v: float) -> str:
    return "∞" if v == float("inf") else f"{v:.2f}"


def epsilon_cell(s: common_pb2.RecordScore) -> str:
    """``1.23 [0.00, 4.56]`` (the empirical epsilon at the score's delta, with its 95% interval), for
    a column headed "empirical ε"; ``—`` for scores stored before it existed (``delta`` 0)."""
    if not s.delta:
        return "—"
    return f"{_num(s.empirical_epsilon)} [{_num(s.empirical_epsilon_ci_low)}, {_num(s.empirical_epsilon_ci_high)}]"


def epsilon_text(s: common_pb2.RecordScore) -> str:
    """``ε 1.23 [0.00, 4.56]``: :func:`epsilon_cell` in running text (``—`` as there)."""
    return f"ε {epsilon_cell(s)}" if s.delta else "—"


def mu_text(s: common_pb2.RecordScore) -> str:
    """``μ 0.52 [0.00, 1.10]`` (Gaussian-DP mu = |d′| with its 95% interval), or ``—``."""
    if not s.delta:
        return "—"
    return f"μ {_num(s.empirical_mu)} [{_num(s.empirical_mu_ci_low)}, {_num(s.empirical_mu_ci_high)}]"


def contributor_summary(scores: Sequence[common_pb2.RecordScore]) -> dict:
    """A contributor's (or any set of records') summary, the same in every client (the ``summary``
    of the contributor CLI's ``--json``, its summary line, the demo, the builder's per-contributor
    table): how many records
    were scored, how many are identifiable above chance (the headline's whole 95% interval above 0),
    the mean headline score, and the worst record by score with its empirical epsilon. Records of
    several rounds count once each, at their latest round (the list's last occurrence)."""
    latest = {s.record_id: s for s in scores}
    if not latest:
        return {"records": 0, "above_chance": 0, "mean_score": None, "worst": None,
                "max_empirical_epsilon": None}
    heads = {rid: headline(s) for rid, s in latest.items()}
    worst = max(latest.values(), key=lambda s: (heads[s.record_id][0], heads[s.record_id][1]))
    eps = [s.empirical_epsilon for s in latest.values() if s.delta]
    return {"records": len(latest), "above_chance": sum(1 for h in heads.values() if h[1] > 0),
            "mean_score": sum(h[0] for h in heads.values()) / len(heads),
            "worst": {"record_id": worst.record_id, "round_id": worst.round_id, "score": heads[worst.record_id][0],
                      "score_ci_low": heads[worst.record_id][1], "score_ci_high": heads[worst.record_id][2],
                      "empirical_epsilon": worst.empirical_epsilon if worst.delta else None,
                      "delta": worst.delta or None},
            "max_empirical_epsilon": max(eps) if eps else None}


def summary_line(summary: dict) -> str:
    """One plain-text line of :func:`contributor_summary`: what a contributor sees under their table."""
    if not summary["records"]:
        return "no records scored yet"
    w = summary["worst"]
    eps = "" if w["empirical_epsilon"] is None else f", empirical ε {_num(w['empirical_epsilon'])} at δ = {w['delta']:g}"
    return (f"{summary['above_chance']} of {summary['records']} records identifiable above chance "
            f"(95% interval above 0); mean score {summary['mean_score']:+.2f}; worst {w['record_id']}: "
            f"{w['score']:+.2f} [{w['score_ci_low']:+.2f}, {w['score_ci_high']:+.2f}]{eps}")


def dp_training_note(result: common_pb2.RoundResult) -> str:
    """The round's DP-SGD guarantee in one sentence (empty without DP-SGD): what each record's
    empirical epsilon, a measurement, is read against."""
    if not result.dp_epsilon:
        return ""
    return (f"Fine-tuned with DP-SGD: the accountant guarantees ε = {_num(result.dp_epsilon)} at δ = "
            f"{result.dp_delta:g} per model (noise multiplier {result.dp_noise_multiplier:.2f}). A record whose "
            "empirical ε lies above it beyond its interval would mean the measurement, or the training, is wrong.")


def dp_facts(s: common_pb2.RecordScore) -> str:
    """The record's empirical DP units in one phrase (for facts lines and CLI text)."""
    if not s.delta:
        return "no DP units (scored before they existed)"
    return f"empirical {epsilon_text(s)} at δ = {s.delta:g}, {mu_text(s)}"


# -- page parts ---------------------------------------------------------------------------------

def card(value: str, label: str, *, small: bool = False) -> str:
    return f'<div class="card"><b{" class=small" if small else ""}>{e(value)}</b><span>{e(label)}</span></div>'


def summary_sentence(scores: Sequence[common_pb2.RecordScore], whose: str) -> str:
    """How many records are identifiable with confidence, and the highest-scoring one (linked)."""
    above = [s for s in scores if headline(s)[1] > 0]
    top = min(scores, key=rank_key)
    h = headline(top)
    if above:
        first = (f"<b>{len(above)} of {e(whose)} {len(scores)} records</b> {'is' if len(above) == 1 else 'are'} "
                 "identifiable more often than chance (the whole 95% interval above 0).")
    else:
        first = (f"<b>None of {e(whose)} {len(scores)} records</b> is identifiable more often than chance with "
                 "confidence (every 95% interval includes 0 or lies below it).")
    return (f'<p class="lead">{first} The highest score: <a class="mono" href="#{e(anchor_id(top.record_id))}">'
            f"{e(top.record_id)}</a>, {h[0]:+.2f} {_interval(*h[1:])} ({_counted(top)}"
            + (f"; empirical {e(epsilon_text(top))} at δ = {top.delta:g}" if top.delta else "") + ").</p>")


def stat_cards(scores: Sequence[common_pb2.RecordScore], extra: Sequence[str] = ()) -> str:
    h = np.array([headline(s) for s in scores], dtype=float).reshape(-1, 3)
    lows = h[:, 1]
    return ('<div class="cards">' + card(str(len(scores)), "records scored")
            + card(str(int((lows > 0).sum())), "with the interval above 0")
            + card(str(int((lows >= 0.5).sum())), "high risk (interval above +0.5)")
            + card(f"{h[:, 0].max():+.2f}", "highest score") + card(f"{np.median(h[:, 0]):+.2f}", "median score")
            + _epsilon_cards(scores) + "".join(extra) + "</div>")


def _epsilon_cards(scores: Sequence[common_pb2.RecordScore]) -> str:
    eps = [s.empirical_epsilon for s in scores if s.delta]
    if not eps:
        return ""
    deltas = sorted({f"{s.delta:g}" for s in scores if s.delta})
    at = f"at δ = {', '.join(deltas)}"
    return (card(_num(max(eps)), f"highest empirical ε ({at})")
            + card(_num(float(np.median(eps))), "median empirical ε"))


def how_to_read(scores: Sequence[common_pb2.RecordScore], *, builder: bool, collapsed: bool) -> str:
    """What the numbers mean; ``collapsed`` puts it in a closed <details>. A warning follows when the
    round had too few models for record-level decisions."""
    n_models = {s.n_in + s.n_out for s in scores}
    n = ", ".join(str(k) for k in sorted(n_models)) or "n"
    methods = ", ".join(sorted({method_name(s.method) for s in scores}))
    attack = f"the membership attack ({e(methods)})" if methods else "the membership attack"
    items = [
        f"<li><b>Privacy score</b> = TPR − FPR of {attack} on the record over the round's {n} fine-tuned "
        "models, half of which trained on it: 0 is a coin flip, 1 means membership is always identified. "
        "The headline is the <b>model-based</b> score 2Φ(d′/2) − 1 from the record's IN and OUT Gaussians "
        "fitted over those models; the paper's <b>counted P</b> (the share of n yes/no decisions) is shown "
        "next to it, and is noisier. “N% more often than chance” reads the score as a percentage: 0.30 "
        "means the attacker says “member” 30 percentage points more often for the models that trained on "
        "the record than for those that did not (right 65% of the time where a coin is right 50%).</li>",
        "<li><b>95% interval</b>: the score is estimated from n models, so it is uncertain. Only a record "
        "whose whole interval is above 0 is identifiable with confidence; an interval that includes 0 is "
        "compatible with no risk — and, if it is wide, with real risk too.</li>",
        "<li><b>Diagnosis plot</b>: the record's statistic phi (how confidently a model predicts its label) "
        "fitted as a Gaussian over the models that trained on it (IN, red) and those that did not (OUT, "
        "blue). The attack says “member” in the shaded region, beyond the dashed threshold. Overlapping "
        "curves mean the record is hard to tell apart; separated curves mean it is exposed.</li>",
        "<li><b>Empirical ε and μ</b>: the same exposure in differential-privacy units. A score s is "
        "exactly the best TPR − FPR against a mechanism that is μ-GDP (Gaussian differential privacy) "
        "with s = 2Φ(μ/2) − 1, and μ converts to an (ε, δ) pair at the task's δ. They say what <i>this "
        "attack</i> measured on this round, with the interval of its estimate: not a guarantee, since a "
        "stronger attack may measure more. ε = 0 means nothing was measured.</li>",
        "<li><b>AUC</b> is threshold-free: the chance that a model that trained on the record scores it "
        "higher than one that did not (0.5 = chance).</li>"]
    if builder:
        items.append("<li><b>ROC</b> (log-log): the attack over every (model, record) pair of the batch; what "
                     "matters is the true positive rate at a low false positive rate.</li>")
    text = f'<ul>{"".join(items)}</ul>'
    text = (f"<details><summary>How to read the scores</summary>{text}</details>" if collapsed
            else f'<div class="box">{text}</div>')
    if min(n_models, default=FEW_MODELS) < FEW_MODELS:
        text += (f'<p class="box warn">Only {n} models per round: a single record\'s score is mostly noise at '
                 f"this n (intervals are wide); {FEW_MODELS} or more models are needed for a record-level "
                 "decision, 64 for stable ones.</p>")
    return text


def raw_row(schema: Schema, x: np.ndarray) -> np.ndarray | None:
    """A tabular record as a person reads it: raw values [F]. ``x`` is a raw row (what the
    contributor submitted) or an encoded one [width] (what the services store), decoded; None when
    it is neither."""
    row = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(row) == len(schema.features):
        return row
    if len(row) == schema.width:
        return schema.decode(row[None, :])[0]
    return None


def tabular_html(schema: Schema, row: np.ndarray, *, top: int = 5, plot_src: str | None = None) -> str:
    """A tabular record's part of its card: why the row is exposed (its most unusual columns against
    the builder's data: z-score and percentile, :meth:`Schema.unusual`), then all its raw values.
    ``plot_src``: a bar plot of those z-scores, where the page has one."""
    why = []
    for u in schema.unusual(row, top=top):
        z = "—" if u["z"] is None else f"{u['z']:+.2f}"
        if u["percentile"] is None:
            pct = "—"
        elif u["z"] is None:
            pct = f"share {u['percentile']:.1f}%"
        else:
            pct = f"{u['percentile']:.1f}"
        why.append(f'<tr><td>{e(u["feature"])}</td><td class="num">{e(u["value"])}</td>'
                   f'<td class="num">{z}</td><td class="num">{e(pct)}</td></tr>')
    plot = (f'<img src="{e(plot_src)}" alt="z-scores of the most unusual columns" width="360" height="170">'
            if plot_src else "")
    values = "".join(f"<tr><td>{e(f.name)}</td><td class=\"num\">{e(schema.cell_text(j, row[j]))}</td></tr>"
                     for j, f in enumerate(schema.features))
    return ('<div class="tabrow"><h4>Why this row is exposed</h4><p>The columns where it is most '
            "unusual against the builder's data: z = (value − mean) / standard deviation, percentile under a "
            "normal fit (a category: the share of rows with its level). Unusual rows are the easiest to single out."
            '</p><table class="why"><tr><th>column</th><th class="num">value</th><th class="num">z-score</th>'
            f'<th class="num">percentile</th></tr>{"".join(why)}</table>{plot}'
            f"<details><summary>All {len(schema.features)} values of the row</summary>"
            f'<div class="rowvals"><table><tr><th>column</th><th class="num">value</th></tr>{values}</table>'
            "</div></details></div>")


def record_card(s: common_pb2.RecordScore, *, thumb_src: str | None, diag_src: str, diag_width: int,
                thumb_missing: str = "no image", diag_collapsed: bool = False, rank: int = 0,
                show_contributor: bool = False, row_html: str = "") -> str:
    """One record: thumbnail (or why there is none), the headline score with its interval and badge,
    the reading, the facts (counted P among them) and the diagnosis plot, open or in a <details>.
    ``row_html`` (a tabular record, from :func:`tabular_html`) stands in for the thumbnail."""
    rid = s.record_id
    if row_html:
        thumb_src, thumb_missing = None, "table row"
    thumb = (f'<img class="thumb" src="{e(thumb_src)}" alt="record {e(rid)}" width="72" height="72">'
             if thumb_src else f'<div class="nothumb">{e(thumb_missing)}</div>')
    lazy = ' loading="lazy"' if diag_collapsed else ""
    diag = (f'<img src="{e(diag_src)}" width="{diag_width}" height="270"{lazy} '
            f'alt="diagnosis plot of {e(rid)}">')
    if diag_collapsed:
        diag = f"<details><summary>Diagnose</summary>{diag}</details>"
    sub, _, idx = rid.rpartition("-")
    where = f"record {int(idx) + 1} of submission {e(sub)}; " if idx.isdigit() and sub else ""
    if show_contributor:
        where = f"contributor <b>{e(s.contributor)}</b>; " + where
    h = headline(s)
    head = (f'<span class="rank">#{rank}</span>' if rank else "") + f'<span class="mono">{e(rid)}</span>'
    return (f'<section class="record" id="{e(anchor_id(rid))}" data-record="{e(rid)}"><div>{thumb}</div><div>'
            f'<h3>{head}</h3><div><span class="score">{h[0]:+.2f}</span>'
            f'<span class="ci">95% interval {_interval(*h[1:])}</span> {badge(s)}</div>'
            f"<div>{interval_svg(*h)}</div>"
            f'<p class="reading">{e(record_reading(s))}</p><div class="facts">{where}round {e(s.round_id)}; '
            f"{s.n_in} models trained on it, {s.n_out} did not; {_counted(s)}; "
            f"AUC {s.auc:.2f} ({e(method_name(s.method))}); {e(dp_facts(s))}</div>{row_html}</div>"
            f'<div class="diag">{diag}</div></section>')


def method_table(metrics: Sequence[common_pb2.BatchMetrics], lead: int) -> str:
    """Every method's batch metrics over the same models; ★ marks the headline method ``lead``."""
    rows = "".join(
        f'<tr class="{"headline" if b.method == lead else ""}"><td class="method">{e(method_name(b.method))}'
        f'{" ★" if b.method == lead else ""}</td><td class="num">{b.auc:.3f}</td>'
        f'<td class="num">{b.tpr_at_1pct_fpr:.3f}</td><td class="num">{b.tpr_at_0_1pct_fpr:.3f}</td>'
        f'<td class="num">{b.mean_counted_p:+.3f}</td></tr>' for b in metrics)
    return ('<table><tr><th>method</th><th class="num">AUC</th><th class="num">TPR @ 1% FPR</th>'
            f'<th class="num">TPR @ 0.1% FPR</th><th class="num">mean counted P</th></tr>{rows}</table>')


def contributors_table(scores: Sequence[common_pb2.RecordScore]) -> str:
    """One row per contributor (:func:`contributor_summary` of their records), the most exposed first:
    what each contributor's own view summarises, side by side for the builder."""
    by: dict[str, list[common_pb2.RecordScore]] = {}
    for s in scores:
        by.setdefault(s.contributor, []).append(s)
    rows = sorted(((who, contributor_summary(own)) for who, own in by.items()),
                  key=lambda kv: (-kv[1]["worst"]["score"], kv[0]))
    body = "".join(
        f'<tr><td>{e(who)}</td><td class="num">{m["records"]}</td><td class="num">{m["above_chance"]}</td>'
        f'<td class="num">{m["mean_score"]:+.2f}</td>'
        f'<td><a class="mono" href="#{e(anchor_id(m["worst"]["record_id"]))}">{e(m["worst"]["record_id"])}</a> '
        f'{m["worst"]["score"]:+.2f} {_interval(m["worst"]["score_ci_low"], m["worst"]["score_ci_high"])}</td>'
        f'<td class="num">{"—" if m["max_empirical_epsilon"] is None else _num(m["max_empirical_epsilon"])}</td></tr>'
        for who, m in rows)
    return ('<table class="contributors"><tr><th>contributor</th><th class="num">records</th>'
            '<th class="num">above chance</th><th class="num">mean score</th><th>most exposed record [95%]</th>'
            f'<th class="num">highest empirical ε</th></tr>{body}</table>')


def records_table(ranked: Sequence[common_pb2.RecordScore], *, readings: bool) -> str:
    """Every record in the given order: headline score and interval, counted P as the secondary
    column, AUC, level and, with ``readings``, the plain-language line."""
    rows = "".join(
        f'<tr><td class="rid"><span class="mono">{e(s.record_id)}</span>'
        f'<span class="minor">{e(s.contributor)}, round {e(s.round_id)}</span></td>'
        f'<td class="num"><b>{headline(s)[0]:+.2f}</b><span class="minor">{_interval(*headline(s)[1:])}</span></td>'
        f"<td>{interval_svg(*headline(s), width=130)}</td>"
        f'<td class="num">{s.counted_p:+.2f}<span class="minor">{_interval(s.counted_p_ci_low, s.counted_p_ci_high)}</span></td>'
        f'<td class="num">{e(epsilon_cell(s))}<span class="minor">{e(mu_text(s))}</span></td>'
        f'<td class="num">{s.auc:.2f}</td><td>{badge(s)}</td>'
        + (f'<td class="reading">{e(record_reading(s))}</td>' if readings else "") + "</tr>"
        for s in ranked)
    return ('<table><tr><th>record, contributor, round</th><th class="num">score [95% interval]</th><th></th>'
            '<th class="num">counted P [95%]</th><th class="num">empirical ε [95%]</th>'
            '<th class="num">AUC</th><th>level</th>'
            + ("<th>reading</th>" if readings else "") + f"</tr>{rows}</table>")


# -- contributor-level masks and recipe comparisons (issue 15) -----------------------------------

def contributions_table(contributions: Sequence[common_pb2.ContributorScore]) -> str:
    """Each whole contribution's score (contributor-level masks): per contributor and round, the
    headline score with its interval and the empirical epsilon with its interval at delta, the most
    exposed first. What this attack measured on the contribution as one unit, not a guarantee."""
    rows = "".join(
        f'<tr><td>{e(c.contributor)}</td><td class="mono">{e(c.round_id)}</td><td class="num">{c.n_records}</td>'
        f'<td class="num"><b>{c.score:+.2f}</b><span class="minor">{_interval(c.score_ci_low, c.score_ci_high)}</span></td>'
        f"<td>{interval_svg(c.score, c.score_ci_low, c.score_ci_high, width=130)}</td>"
        f'<td class="num">{_num(c.empirical_epsilon)} [{_num(c.empirical_epsilon_ci_low)}, '
        f'{_num(c.empirical_epsilon_ci_high)}]<span class="minor">at δ = {c.delta:g}; μ {_num(c.empirical_mu)} '
        f"[{_num(c.empirical_mu_ci_low)}, {_num(c.empirical_mu_ci_high)}]</span></td>"
        f'<td class="num">{c.n_in} / {c.n_out}</td>'
        f'<td><span class="badge {risk_level(c.score_ci_low, c.score_ci_high)[0]}">'
        f"{e(risk_level(c.score_ci_low, c.score_ci_high)[1])}</span></td></tr>"
        for c in sorted(contributions, key=lambda c: (-c.score_ci_low, -c.score, c.contributor, c.round_id)))
    return ('<table class="contributions"><tr><th>contributor</th><th>round</th><th class="num">records</th>'
            '<th class="num">score [95%]</th><th>interval</th><th class="num">empirical ε [95%]</th>'
            f'<th class="num">models in / out</th><th>level</th></tr>{rows}</table>')


def recipe_rows(c: common_pb2.RecipeComparison) -> list[dict]:
    """Per recipe of a comparison ("current" first): its state and, once DONE, the held-out
    accuracy, the headline method's AUC and mean score, how many records are identifiable above
    chance (interval above 0), the largest empirical epsilon and the DP-SGD epsilon (0: none);
    the numbers of ``clients.api.comparison_dict``."""
    out = []
    for v in c.variants:
        done = v.status.state == common_pb2.ROUND_STATE_DONE
        out.append({"name": v.name, "state": common_pb2.RoundState.Name(v.status.state).removeprefix(
                        "ROUND_STATE_").lower(), "message": v.status.message, "done": done,
                    "models_done": v.status.models_done, "models_total": v.status.models_total,
                    "heldout_accuracy": v.heldout_accuracy, "heldout_records": v.heldout_records,
                    "auc": v.batch.auc, "mean_score": v.batch.mean_score,
                    "above_chance": sum(s.score_ci_low > 0 for s in v.scores), "records": len(v.scores),
                    "max_empirical_epsilon": max((s.empirical_epsilon for s in v.scores), default=0.0),
                    "dp_epsilon": v.dp_epsilon})
    return out


def comparison_done(c: common_pb2.RecipeComparison) -> bool:
    """Every recipe has ended (DONE or FAILED): the comparison will not change any more."""
    return bool(c.variants) and all(v.status.state in serde.TERMINAL_ROUND_STATES for v in c.variants)


def comparison_table(c: common_pb2.RecipeComparison) -> str:
    """The risk/utility table of a recipe comparison: one row per recipe; one still running shows
    its progress, one that failed its message."""
    rows = []
    for r in recipe_rows(c):
        if r["done"]:
            rows.append(
                f'<tr><td><b>{e(r["name"])}</b></td><td class="num">{r["heldout_accuracy"]:.3f}'
                f'<span class="minor">{r["heldout_records"]} held-out records</span></td>'
                f'<td class="num">{r["auc"]:.3f}</td><td class="num">{r["mean_score"]:+.3f}</td>'
                f'<td class="num">{r["above_chance"]} of {r["records"]}</td>'
                f'<td class="num">{_num(r["max_empirical_epsilon"])}</td>'
                f'<td class="num">{_num(r["dp_epsilon"]) if r["dp_epsilon"] else "—"}</td></tr>')
        else:
            what = (f"failed: {r['message']}" if r["state"] == "failed"
                    else f"{r['state']}: {r['models_done']} / {r['models_total']} models")
            rows.append(f'<tr><td><b>{e(r["name"])}</b></td><td colspan="6">{e(what)}</td></tr>')
    return ('<table class="comparison"><tr><th>recipe</th><th class="num">held-out accuracy</th>'
            '<th class="num">AUC</th><th class="num">mean score</th><th class="num">records above chance</th>'
            '<th class="num">max empirical ε</th><th class="num">DP-SGD ε</th></tr>' + "".join(rows) + "</table>")


def exposed_everywhere_html(c: common_pb2.RecipeComparison) -> str:
    """The records identifiable above chance under every recipe (what no recipe tried fixes)."""
    if not all(v.status.state == common_pb2.ROUND_STATE_DONE for v in c.variants):
        return ""  # the service lists them once every recipe is DONE
    ids = list(c.exposed_everywhere)
    if not ids:
        return "<p>No record is identifiable above chance under every recipe.</p>"
    return (f"<p>{len(ids)} record(s) identifiable above chance under every recipe (their whole interval above 0 "
            "whatever the recipe): " + ", ".join(f'<span class="mono">{e(r)}</span>' for r in ids) + ".</p>")
