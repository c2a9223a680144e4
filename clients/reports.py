"""HTML reports of privacy scores: a contributor's view of their own records, a builder's batch view.

A report is a folder: ``report.html`` (self-contained: inline CSS, no scripts, no external assets),
PNG figures next to it (per-record figures in ``records/``) and ``scores.csv``. Rendering here is
plain functions over what the API returned (``RecordScore``, ``RoundResult``, ``Task``); the
command-line tools fetch, this module writes. Record images come only from local files the user
passes (:class:`RecordImages`), never from the service: builders never read raw records through the
API (DESIGN.md section 5).

Reading a score: P = TPR - FPR of the membership attack on the record over the round's n models
(0 = a coin flip, 1 = membership always identified), reported with its 95% interval.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from clients.api import score_dict
from clients.cli_common import InputError, Records, is_image_record_shape
from ftps.common import serde
from ftps.v1 import common_pb2, registry_pb2

__all__ = ["ReportFiles", "RecordImages", "LEVEL_FILL", "reading", "risk_level", "interval_svg",
           "contributor_report", "builder_report", "write_scores_csv", "load_record_images"]

FEW_MODELS = 16  # below this a single record's score is mostly binomial noise (DESIGN.md section 3)
TOP_RISK = 10
# An interval that includes 0 but reaches this high does not show the record is safe: say so.
WIDE = 0.25
Progress = Callable[[int, int], None]


# -- words --------------------------------------------------------------------------------------

def _pct(v: float) -> str:
    return f"{abs(round(100 * v))}%"


def _signed_pct(v: float) -> str:
    sign = "+" if v > 0 else "−" if v < 0 else ""
    if 0 < abs(v) < 0.005:  # "0%" would hide which side of 0 a bound is on
        return f"{sign}{abs(100 * v):.1f}%"
    return f"{sign if round(100 * v) else ''}{abs(round(100 * v))}%"


def reading(score: float, ci_low: float, ci_high: float, *, n_models: int = 0) -> str:
    """One plain-language line for a record's score P with its 95% interval [ci_low, ci_high]."""
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


def _method(s: common_pb2.RecordScore) -> str:
    return serde.METHOD_NAMES.get(s.method, "")


# -- local record images ------------------------------------------------------------------------

@dataclass
class RecordImages:
    """Record images from the user's own files, looked up by the service's record id.

    Ids are ``<submission>-<index>``: a file given as ``PATH`` maps index i to its i-th record (the
    contributor's submitted file, in submission order); ``SUBMISSION=PATH`` only for that submission;
    a file naming its records (npz array / CSV column ``record_id``) maps ids directly."""

    sources: list[tuple[str | None, Records]] = field(default_factory=list)

    def add(self, submission: str | None, records: Records) -> None:
        if records.record_ids is None and submission is None and any(
                s is None and r.record_ids is None for s, r in self.sources):
            raise InputError("more than one --records file maps by index to every submission: "
                             "prefix them with SUBMISSION_ID= to say which is which")
        self.sources.append((submission, records))

    def __bool__(self) -> bool:
        return bool(self.sources)

    def get(self, record_id: str) -> np.ndarray | None:
        sub, _, idx = record_id.rpartition("-")
        for prefix, recs in self.sources:
            if recs.record_ids is not None:
                if record_id in recs.record_ids:
                    return recs.x[recs.record_ids.index(record_id)]
                continue
            if (prefix is not None and prefix != sub) or not idx.isdigit():
                continue
            i = int(idx)
            if i >= len(recs.x):
                raise InputError(f"{recs.path} has {len(recs.x)} records but record {record_id} is number "
                                 f"{i + 1} of its submission: is this the file you submitted?")
            return recs.x[i]
        return None

    def check_submissions(self, record_ids: Iterable[str]) -> str:
        """A warning when one unprefixed file is mapped onto records of several submissions."""
        if not any(p is None and r.record_ids is None for p, r in self.sources):
            return ""
        prefixed = {p for p, _ in self.sources if p}
        subs = sorted({rid.rpartition("-")[0] for rid in record_ids} - prefixed)
        if len(subs) > 1:
            return (f"your records come from {len(subs)} submissions ({', '.join(subs)}) and one --records "
                    "file was mapped onto each by position; pass SUBMISSION_ID=FILE per submission if "
                    "the images look wrong.")
        return ""


# -- files --------------------------------------------------------------------------------------

@dataclass
class ReportFiles:
    html: Path
    csv: Path
    pngs: list[Path]
    n_records: int

    def as_dict(self) -> dict:
        return {"html": str(self.html), "csv": str(self.csv), "pngs": [str(p) for p in self.pngs],
                "records": self.n_records}


_CSV_EXTRA = ("mu_in", "sigma_in", "mu_out", "sigma_out")


def write_scores_csv(path: Path, scores: Sequence[common_pb2.RecordScore]) -> Path:
    with path.open("w", newline="") as f:
        w = None
        for s in scores:
            row = score_dict(s) | {k: getattr(s, k) for k in _CSV_EXTRA} | {
                "reading": reading(s.score, s.ci_low, s.ci_high, n_models=s.n_in + s.n_out)}
            if w is None:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
            w.writerow(row)
        if w is None:
            csv.writer(f).writerow([*score_dict(common_pb2.RecordScore()), *_CSV_EXTRA, "reading"])
    return path


def _safe(name: str) -> str:
    """A file name from a record id (ids are validated by the service; this keeps it so)."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return s[:80] or "record"


class _Figures:
    """Writes the report's PNGs and remembers them."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        (out_dir / "records").mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self.not_images: tuple[int, ...] | None = None

    def add(self, rel: str) -> Path:
        p = self.out_dir / rel
        self.written.append(p)
        return p

    def diagnosis(self, s: common_pb2.RecordScore, *, alpha: float, offline: tuple[float, float] | None,
                  offline_hidden: bool = False) -> str:
        from clients import report_plots

        rel = f"records/diag-{_safe(s.record_id)}.png"
        method = _method(s)
        note = ""
        if method == "offline-global" and offline is None and offline_hidden:
            note = "threshold: the task's offline Gaussian (builder only)"
        report_plots.diagnosis_png(
            mu_in=s.mu_in, sigma_in=s.sigma_in, mu_out=s.mu_out, sigma_out=s.sigma_out, method=method,
            alpha=alpha, offline=offline, note=note, path=self.add(rel),
            title=f"{s.record_id}: P = {s.score:+.2f} [{s.ci_low:+.2f}, {s.ci_high:+.2f}] ({method})")
        return rel

    def thumbnail(self, record_id: str, images: RecordImages | None) -> str | None:
        from clients import report_plots

        if not images:
            return None
        x = images.get(record_id)
        if x is None:
            return None
        if not is_image_record_shape(x.shape):
            self.not_images = tuple(x.shape)
            return None
        rel = f"records/thumb-{_safe(record_id)}.png"
        report_plots.thumbnail_png(x, self.add(rel))
        return rel


# -- html ---------------------------------------------------------------------------------------

# Score, thumbnail and risk-badge styles, shared with the web client (clients/web/static.py).
SCORE_CSS = """.score{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums}
.ci{color:#5b6475;font-size:14px;margin-left:6px;font-variant-numeric:tabular-nums}
.thumb{width:72px;height:72px;border:1px solid #d5d9e0;image-rendering:pixelated;background:#fff}
.nothumb{width:72px;height:72px;border:1px dashed #c9ced8;color:#8a92a3;font-size:11px;display:flex;
align-items:center;justify-content:center;text-align:center}
"""
BADGE_CSS = """.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600;
vertical-align:middle;white-space:nowrap}
.high{background:#fbd9d6;color:#9b1209}.elevated{background:#ffedc9;color:#7d4a00}
.chance{background:#e3f2e7;color:#1d6532}.below{background:#e6ebf5;color:#34496e}
.uncertain{background:#eceef2;color:#4a5263}
"""

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2330;
background:#f5f6f8;margin:0}
main{max-width:1140px;margin:0 auto;padding:28px 28px 64px}
h1{font-size:25px;margin:0 0 2px;line-height:1.25}
h2{font-size:19px;margin:36px 0 10px;padding-bottom:4px;border-bottom:1px solid #dfe2e8}
h3{font-size:16px;margin:20px 0 8px}
.sub{color:#5b6475;margin:0 0 18px}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:13px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:10px 14px;min-width:110px;flex:1}
.card b{display:block;font-size:22px;line-height:1.3}.card span{color:#5b6475;font-size:13px}
.card b.small{font:600 14px/1.9 ui-monospace,"DejaVu Sans Mono",Menlo,monospace;word-break:break-all}
.lead{font-size:16px;margin:8px 0 4px}
.box{background:#fff;border:1px solid #e1e4ea;border-left:4px solid #4a72c4;border-radius:6px;
padding:8px 18px;margin:16px 0}
.box p,.box li{margin:6px 0}.box ul{padding-left:20px;margin:6px 0}
.warn{border-left-color:#d08a00;background:#fffaf0}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e1e4ea;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:middle}
th{background:#f0f2f5;font-weight:600;font-size:13px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.headline td{font-weight:600}
img{max-width:100%;height:auto}
figure{margin:12px 0;background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:8px}
figcaption{color:#5b6475;font-size:13px;padding:4px 6px}
.pair{display:grid;grid-template-columns:minmax(0,520px) minmax(0,1fr);gap:18px;align-items:start}
.record{display:grid;grid-template-columns:84px minmax(0,1fr) 560px;gap:18px;background:#fff;
border:1px solid #e1e4ea;border-radius:8px;padding:14px 16px;margin:12px 0;align-items:center}
.record h3{margin:0 0 2px;font-size:15px;word-break:break-all}
.record .reading{margin:8px 0 6px;font-size:15px}
.record .facts{color:#5b6475;font-size:13px}
"""+SCORE_CSS+"""td .thumb{width:48px;height:48px}
"""+BADGE_CSS+"""svg.iv{vertical-align:middle}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
footer{color:#7a8294;font-size:12px;margin-top:40px}
@media (max-width:980px){.record{grid-template-columns:84px minmax(0,1fr)}
.record .diag{grid-column:1/-1}.pair{grid-template-columns:1fr}}
"""

LEVEL_FILL = {"high": "#c0392b", "elevated": "#d68910", "chance": "#5d9c6b", "below": "#5a6f99", "uncertain": "#8a92a3"}


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


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


def _badge(s: common_pb2.RecordScore) -> str:
    cls, label = risk_level(s.ci_low, s.ci_high)
    return f'<span class="badge {cls}">{label}</span>'


def _page(title: str, body: str) -> str:
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>\n{body}\n"
            f"<footer>FT-PrivacyScore report, generated {generated}. Scores: LiRA membership inference "
            "on fine-tuned models (Carlini et al. S&amp;P'22; FT-PrivacyScore, Gu et al. CCS'24 demo).</footer>"
            "</main></body></html>\n")


def _card(value: str, label: str, *, small: bool = False) -> str:
    return f'<div class="card"><b{" class=small" if small else ""}>{value}</b><span>{label}</span></div>'


def _how_to_read(n_models: set[int], method: str, *, builder: bool) -> str:
    n = ", ".join(str(k) for k in sorted(n_models)) or "?"
    few = min(n_models, default=FEW_MODELS) < FEW_MODELS
    items = [
        f"<li><b>Privacy score P</b> = TPR − FPR of a membership attack ({_e(method)}) on the record over "
        f"the round's {n} fine-tuned models, half of which trained on it. 0 is a coin flip; 1 means "
        "membership is always identified. “N% more often than chance” reads P as a percentage: "
        "P = 0.30 means the attacker says “member” 30 percentage points more often for the models that "
        "trained on the record than for those that did not (right 65% of the time where a coin is "
        "right 50%).</li>",
        "<li><b>95% interval</b>: P counts yes/no decisions over the models, so it is uncertain. Only a "
        "record whose whole interval is above 0 is identifiable with confidence; an interval that "
        "includes 0 is compatible with no risk — and, if it is wide, with real risk too.</li>",
        "<li><b>Diagnosis plot</b>: the record's statistic phi (how confidently a model predicts its "
        "label) fitted as a Gaussian over the models that trained on it (IN, red) and those that did "
        "not (OUT, blue). The attack says “member” in the shaded region, beyond the dashed threshold. "
        "Overlapping curves mean the record is hard to tell apart; separated curves mean it is exposed.</li>",
        "<li><b>AUC</b> is threshold-free: the chance that a model that trained on the record scores it "
        "higher than one that did not (0.5 = chance). <b>Model-based</b> is 2Φ(d′/2)−1 from the fitted "
        "Gaussians, a smoother estimate of the same P; the headline is the counted P.</li>",
    ]
    if builder:
        items.append("<li><b>ROC</b> (log-log): the attack over every (model, record) pair of the batch; "
                     "what matters is the true positive rate at a low false positive rate.</li>")
    warn = ""
    if few:
        warn = (f'<div class="box warn"><p>Only {n} models in this round: a single record\'s score is mostly '
                f"noise at this n (intervals are wide); {FEW_MODELS} or more models are needed for a "
                "record-level decision, 64 for stable ones.</p></div>")
    return f'<div class="box"><ul>{"".join(items)}</ul></div>{warn}'


def _notes(notes: Sequence[str]) -> str:
    notes = [n for n in notes if n]
    if not notes:
        return ""
    return '<div class="box warn">' + "".join(f"<p>{_e(n)}</p>" for n in notes) + "</div>"


def _record_card(s: common_pb2.RecordScore, diag: str, thumb: str | None, thumb_missing: str) -> str:
    sub, _, idx = s.record_id.rpartition("-")
    where = f"record {int(idx) + 1} of submission {_e(sub)}, " if idx.isdigit() and sub else ""
    img = (f'<img class="thumb" src="{_e(thumb)}" alt="record {_e(s.record_id)}">' if thumb
           else f'<div class="nothumb">{_e(thumb_missing)}</div>')
    return (
        f'<section class="record" id="r-{_e(_safe(s.record_id))}"><div>{img}</div><div>'
        f'<h3 class="mono">{_e(s.record_id)}</h3>'
        f'<div><span class="score">{s.score:+.2f}</span><span class="ci">95% interval '
        f'[{s.ci_low:+.2f}, {s.ci_high:+.2f}]</span> {_badge(s)}</div>'
        f"<div>{interval_svg(s.score, s.ci_low, s.ci_high)}</div>"
        f'<p class="reading">{_e(reading(s.score, s.ci_low, s.ci_high, n_models=s.n_in + s.n_out))}</p>'
        f'<div class="facts">{where}round {_e(s.round_id)}; {s.n_in} models with it, {s.n_out} without; '
        f"AUC {s.auc:.2f}; model-based {s.model_score:+.2f}</div></div>"
        f'<div class="diag"><img src="{_e(diag)}" width="560" height="270" '
        f'alt="diagnosis plot of {_e(s.record_id)}"></div></section>')


def _summary_sentence(scores: Sequence[common_pb2.RecordScore], whose: str) -> str:
    above = [s for s in scores if s.ci_low > 0]
    top = max(scores, key=lambda s: (s.score, s.ci_low))
    if above:
        first = (f"<b>{len(above)} of {whose} {len(scores)} records</b> "
                 f"{'is' if len(above) == 1 else 'are'} identifiable more often than chance "
                 "(the whole 95% interval above 0).")
    else:
        first = (f"<b>None of {whose} {len(scores)} records</b> is identifiable more often than chance "
                 "with confidence (every 95% interval includes 0 or lies below it).")
    return (f'<p class="lead">{first} The highest score: <a href="#r-{_e(_safe(top.record_id))}" class="mono">'
            f"{_e(top.record_id)}</a>, P = {top.score:+.2f} [{top.ci_low:+.2f}, {top.ci_high:+.2f}].</p>")


def _stat_cards(scores: Sequence[common_pb2.RecordScore], extra: Sequence[str] = ()) -> str:
    p = np.array([s.score for s in scores])
    lows = np.array([s.ci_low for s in scores])
    return ('<div class="cards">' + _card(str(len(scores)), "records scored")
            + _card(str(int((lows > 0).sum())), "with the interval above 0")
            + _card(str(int((lows >= 0.5).sum())), "high risk (interval above +0.5)")
            + _card(f"{p.max():+.2f}", "highest score P") + _card(f"{np.median(p):+.2f}", "median score P")
            + "".join(extra) + "</div>")


def _thumb_missing_text(images: RecordImages | None, figs: _Figures) -> str:
    if figs.not_images:
        return "not an image"
    return "no image" if not images else "not in file"


# -- contributor --------------------------------------------------------------------------------

def contributor_report(out_dir: Path, *, task_id: str, contributor: str, scores: Sequence[common_pb2.RecordScore],
                       task: registry_pb2.Task | None = None, images: RecordImages | None = None,
                       notes: Sequence[str] = (), progress: Progress | None = None) -> ReportFiles:
    """A contributor's page: a summary, then per record (highest score first) its score with the
    interval, a one-line reading, the diagnosis plot and, given ``images``, a thumbnail."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out_dir)
    notes = list(notes)
    if images:
        notes.append(images.check_submissions(s.record_id for s in scores))
    alpha = (task.settings.alpha if task is not None else 0.0) or 0.05
    name = task.name if task is not None and task.name else task_id
    who = contributor or "you"
    title = f"Privacy report — {who}, task {name}"
    ordered = sorted(scores, key=lambda s: (-s.score, -s.ci_low, s.record_id))
    cards = []
    for k, s in enumerate(ordered):
        diag = figs.diagnosis(s, alpha=alpha, offline=None, offline_hidden=True)
        thumb = figs.thumbnail(s.record_id, images)
        cards.append((s, diag, thumb))
        if progress:
            progress(k + 1, len(ordered))
    if images and figs.not_images:
        notes.append(f"records of shape {figs.not_images} are not images: no thumbnails.")
    elif not images:
        notes.append("No record images: pass --records with the file you submitted (an .npz or a folder "
                     "of images with labels.csv) to see each record next to its score.")
    csv_path = write_scores_csv(out_dir / "scores.csv", sorted(scores, key=lambda s: (s.round_id, s.index)))

    head = (f"<h1>Privacy report for {_e(who)}</h1><p class=\"sub\">Task <b>{_e(name)}</b> "
            f"(<span class=\"mono\">{_e(task_id)}</span>) — your records only.</p>")
    if not scores:
        body = head + ('<div class="box"><p>No scores yet: your records are waiting for a round (a round '
                       "starts when the task has enough pending records, or when the builder starts one)."
                       "</p></div>")
        html_path = out_dir / "report.html"
        html_path.write_text(_page(title, body), encoding="utf-8")
        return ReportFiles(html_path, csv_path, [], 0)

    methods = sorted({_method(s) for s in scores})
    n_models = {s.n_in + s.n_out for s in scores}
    rounds = sorted({s.round_id for s in scores})
    figure = ""
    if len(scores) >= 2:
        from services.lira_scorer import plots

        plots.scores_with_intervals_png([s.score for s in scores], [s.ci_low for s in scores],
                                        [s.ci_high for s in scores], path=figs.add("scores.png"),
                                        title=f"Your {len(scores)} records, task {name}")
        figure = ('<figure><img src="scores.png" alt="histogram of your scores and every record\'s interval">'
                  "<figcaption>Left: how your records' scores spread. Right: every record's score with its "
                  "95% interval, sorted; red where the whole interval is above 0.</figcaption></figure>")
    missing = _thumb_missing_text(images, figs)
    body = (head + "<h2>Summary</h2>" + _summary_sentence(scores, "your")
            + _stat_cards(scores, [_card(", ".join(_e(r) for r in rounds),
                                         "round" + ("s" if len(rounds) > 1 else ""), small=True)])
            + f"<p class=\"sub\">Method {_e(', '.join(methods))}; "
              f"{', '.join(str(n) for n in sorted(n_models))} fine-tuned models per round.</p>"
            + _notes(notes) + "<h2>How to read this page</h2>"
            + _how_to_read(n_models, ", ".join(methods), builder=False) + figure
            + f"<h2>Your records, highest score first ({len(scores)})</h2>"
            + "".join(_record_card(s, d, t, missing) for s, d, t in cards))
    html_path = out_dir / "report.html"
    html_path.write_text(_page(title, body), encoding="utf-8")
    return ReportFiles(html_path, csv_path, figs.written, len(scores))


# -- builder ------------------------------------------------------------------------------------

def _roc_label(b: common_pb2.BatchMetrics, headline: bool) -> str:
    # Short: the table next to the plot has every number.
    return f"{serde.METHOD_NAMES.get(b.method, '?')}{' ★' if headline else ''}  AUC={b.auc:.2f}"


def _round_section(rid: str, result: common_pb2.RoundResult, figs: _Figures) -> str:
    from services.lira_scorer import plots

    metrics = list(result.method_metrics) or ([result.batch] if result.HasField("batch") else [])
    headline = result.batch.method
    n = result.batch.n_models
    m = result.batch.n_records or result.status.n_records
    parts = [f"<h3>Round <span class=\"mono\">{_e(rid)}</span> — {m} records, {n} models</h3>"]
    curves = [(_roc_label(b, b.method == headline), b.roc_fpr, b.roc_tpr) for b in metrics if len(b.roc_fpr)]
    roc = ""
    if curves:
        rel = f"roc-{_safe(rid)}.png"
        plots.roc_curves_png(curves, title=f"ROC of every method, round {rid} (n={n}, m={m})", path=figs.add(rel))
        roc = f'<figure><img src="{_e(rel)}" alt="log-log ROC of every method, round {_e(rid)}"></figure>'
    rows = "".join(
        f'<tr class="{"headline" if b.method == headline else ""}">'
        f'<td style="white-space:nowrap">{_e(serde.METHOD_NAMES.get(b.method, "?"))}'
        f'{" ★" if b.method == headline else ""}</td><td class="num">{b.auc:.3f}</td>'
        f'<td class="num">{b.tpr_at_1pct_fpr:.3f}</td><td class="num">{b.tpr_at_0_1pct_fpr:.3f}</td>'
        f'<td class="num">{b.mean_score:+.3f}</td></tr>' for b in metrics)
    table = ('<table><tr><th>method</th><th class="num">AUC</th><th class="num">TPR @ 1% FPR</th>'
             f'<th class="num">TPR @ 0.1% FPR</th><th class="num">mean P</th></tr>{rows}</table>'
             "<p class=\"sub\">★ the headline method (the task's setting); every method scores the same "
             "fine-tuned models, no extra training.</p>")
    names = {serde.METHOD_NAMES.get(b.method) for b in metrics}
    extra = []
    if result.HasField("offline") and result.offline.k:
        o = result.offline
        extra.append(f"Offline Gaussian (the paper's offline-global attack): mu = {o.mu:.3f}, sigma = {o.sigma:.3f} "
                     f"from k = {o.k} shadow models, fitted {_e(o.fitted_at)}.")
    elif "offline-global" not in names:
        extra.append("offline-global is not in this round: the task had no offline Gaussian "
                     "(run <code>ftps-builder prepare</code> before the round).")
    out_pairs = sum(s.n_out for s in result.scores)
    if out_pairs and 1 / out_pairs > 0.001:
        extra.append(f"With {out_pairs} OUT (model, record) pairs the lowest measurable false positive rate is "
                     f"{1 / out_pairs:.2%}: below it the TPR columns are read at FPR 0 (more models or "
                     "records resolve lower rates).")
    if result.timings:
        extra.append("Timings: " + ", ".join(f"{_e(k)} {v:.1f} s" for k, v in sorted(result.timings.items())) + ".")
    if not metrics:
        table = f"<p>No batch metrics: the round is {_e(_state(result.status.state))}.</p>"
    return "".join(parts) + f'<div class="pair"><div>{roc}</div><div>{table}' + "".join(
        f'<p class="sub">{x}</p>' for x in extra) + "</div></div>"


def _state(state: int) -> str:
    return common_pb2.RoundState.Name(state).removeprefix("ROUND_STATE_").lower()


def builder_report(out_dir: Path, *, task_id: str, scores: Sequence[common_pb2.RecordScore],
                   rounds: dict[str, common_pb2.RoundResult], task: registry_pb2.Task | None = None,
                   images: RecordImages | None = None, notes: Sequence[str] = (),
                   progress: Progress | None = None, top: int = TOP_RISK) -> ReportFiles:
    """The builder's batch view: score histogram and intervals, per round the log-log ROC and the
    metrics of every method, the highest-risk records (diagnosis plots, thumbnails from local files
    only) and a table of every record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out_dir)
    notes = list(notes)
    alpha = (task.settings.alpha if task is not None else 0.0) or 0.05
    name = task.name if task is not None and task.name else task_id
    title = f"Batch privacy report — task {name}"
    csv_path = write_scores_csv(out_dir / "scores.csv", sorted(scores, key=lambda s: (s.round_id, s.index)))
    owner = f", owner {_e(task.owner)}" if task is not None and task.owner else ""
    head = (f"<h1>Batch privacy report</h1><p class=\"sub\">Task <b>{_e(name)}</b> "
            f"(<span class=\"mono\">{_e(task_id)}</span>{owner}) — every contributor's records.</p>")
    if not scores:
        body = head + '<div class="box"><p>No scored records yet: no round of this task has finished.</p></div>'
        html_path = out_dir / "report.html"
        html_path.write_text(_page(title, body), encoding="utf-8")
        return ReportFiles(html_path, csv_path, [], 0)

    from services.lira_scorer import plots

    methods = sorted({_method(s) for s in scores})
    n_models = {s.n_in + s.n_out for s in scores}
    contributors = sorted({s.contributor for s in scores})
    plots.scores_with_intervals_png([s.score for s in scores], [s.ci_low for s in scores],
                                    [s.ci_high for s in scores], path=figs.add("scores.png"),
                                    title=f"Privacy scores, task {name} ({', '.join(methods)})")
    ranked = sorted(scores, key=lambda s: (-s.score, -s.ci_low, s.record_id))
    risky = ranked[:top]
    rows = []
    for k, s in enumerate(risky):
        r = rounds.get(s.round_id)
        offline = (r.offline.mu, r.offline.sigma) if r is not None and r.HasField("offline") and r.offline.k else None
        diag = figs.diagnosis(s, alpha=alpha, offline=offline)
        thumb = figs.thumbnail(s.record_id, images)
        rows.append((s, diag, thumb))
        if progress:
            progress(k + 1, len(risky))
    if not images:
        notes.append("No record thumbnails: the service never gives a builder raw records (DESIGN.md §5). "
                     "Pass --records with your own local copy of the batch (an .npz or a folder of images; "
                     "SUBMISSION_ID=FILE per submission, or a file with a record_id array/column) to see them.")
    elif figs.not_images:
        notes.append(f"records of shape {figs.not_images} are not images: no thumbnails.")
    missing = _thumb_missing_text(images, figs)
    headline_auc = [r.batch.auc for r in rounds.values() if r.HasField("batch") and r.batch.n_models]
    n_rounds = len(rounds) or len({s.round_id for s in scores})
    extra_cards = [_card(str(len(contributors)), "contributors"), _card(str(n_rounds), "rounds")]
    if headline_auc:
        extra_cards.append(_card(f"{np.mean(headline_auc):.2f}", "batch AUC (headline)"))

    risk_rows = "".join(
        f'<tr id="r-{_e(_safe(s.record_id))}"><td class="num">{k + 1}</td><td>'
        + (f'<img class="thumb" src="{_e(t)}" alt="">' if t else f'<div class="nothumb">{_e(missing)}</div>')
        + f'</td><td><div class="mono">{_e(s.record_id)}</div><div class="sub" style="margin:0">'
          f'{_e(s.contributor)}, round {_e(s.round_id)}</div><div><span class="score" style="font-size:18px">'
          f'{s.score:+.2f}</span> <span class="ci">[{s.ci_low:+.2f}, {s.ci_high:+.2f}]</span> {_badge(s)}</div>'
          f'<div class="sub" style="margin:2px 0 0;font-size:13px">AUC {s.auc:.2f}; model-based {s.model_score:+.2f}; '
          f'{s.n_in}/{s.n_out} models in/out</div>'
          f'<p style="margin:6px 0 0;font-size:14px">'
          f"{_e(reading(s.score, s.ci_low, s.ci_high, n_models=s.n_in + s.n_out))}</p></td>"
          f'<td style="width:560px"><img src="{_e(d)}" width="560" height="270" alt="diagnosis plot"></td></tr>'
        for k, (s, d, t) in enumerate(rows))
    many_rounds = len({s.round_id for s in scores}) > 1
    all_rows = "".join(
        f'<tr><td><div class="mono" style="white-space:nowrap">{_e(s.record_id)}</div>'
        f'<div class="sub" style="margin:0;font-size:12px">{_e(s.contributor)}'
        f'{", round " + _e(s.round_id) if many_rounds else ""}</div></td>'
        f'<td class="num"><b>{s.score:+.2f}</b><br><span class="ci" style="margin:0;font-size:12px">'
        f"[{s.ci_low:+.2f}, {s.ci_high:+.2f}]</span></td>"
        f"<td>{interval_svg(s.score, s.ci_low, s.ci_high, width=130)}</td>"
        f'<td class="num">{s.auc:.2f}</td><td class="num">{s.model_score:+.2f}</td><td>{_badge(s)}</td>'
        f'<td style="font-size:13px;min-width:280px">'
        f"{_e(reading(s.score, s.ci_low, s.ci_high, n_models=s.n_in + s.n_out))}</td></tr>"
        for s in ranked)
    round_ids = sorted(rounds) or sorted({s.round_id for s in scores})
    body = (
        head + "<h2>Summary</h2>" + _summary_sentence(scores, "the") + _stat_cards(scores, extra_cards)
        + f"<p class=\"sub\">Method {_e(', '.join(methods))}; {', '.join(str(n) for n in sorted(n_models))} "
          f"fine-tuned models per round; contributors {_e(', '.join(contributors))}.</p>"
        + _notes(notes) + "<h2>How to read this page</h2>" + _how_to_read(n_models, ", ".join(methods), builder=True)
        + "<h2>Scores of the batch</h2><figure><img src=\"scores.png\" alt=\"score histogram and intervals\">"
          "<figcaption>Left: histogram of the records' scores P. Right: every record's score with its 95% "
          "interval, sorted; red where the whole interval is above 0.</figcaption></figure>"
        + "<h2>Attack strength, every method</h2>"
        + "".join(_round_section(rid, rounds[rid], figs) if rid in rounds
                  else f"<h3>Round {_e(rid)}</h3><p>Round details unavailable.</p>" for rid in round_ids)
        + f"<h2>Highest-risk records (top {len(rows)} by score)</h2>"
        + '<table><tr><th class="num">#</th><th>record</th><th>score and reading</th><th>diagnosis</th></tr>'
        + risk_rows + "</table>"
        + f"<h2>All records ({len(scores)})</h2><details open><summary>every record, highest score first</summary>"
        + '<table><tr><th>record, contributor</th><th class="num">P [95% interval]</th><th></th>'
          '<th class="num">AUC</th><th class="num">model-based</th><th>level</th><th>reading</th></tr>'
        + all_rows + "</table></details>")
    html_path = out_dir / "report.html"
    html_path.write_text(_page(title, body), encoding="utf-8")
    return ReportFiles(html_path, csv_path, figs.written, len(scores))


def load_record_images(specs: Sequence[str], *, shape: tuple[int, ...] | None,
                       num_classes: int | None = None) -> RecordImages:
    """``--records`` values (``PATH`` or ``SUBMISSION_ID=PATH``; npz or image folder) -> RecordImages."""
    from clients.cli_common import load_records, records_arg

    images = RecordImages()
    for spec in specs:
        sub, path = records_arg(spec)
        if not path.exists():
            raise InputError(f"--records {spec}: {path} not found")
        images.add(sub, load_records(path, shape=shape, num_classes=num_classes))
    return images
