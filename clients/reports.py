"""HTML reports of privacy scores: a contributor's view of their own records, a builder's batch view.

A report is a folder: ``report.html`` (self-contained: inline CSS, no scripts, no external assets),
PNG figures next to it (per-record figures in ``records/``) and ``scores.csv``. Rendering here is
plain functions over what the API returned (``RecordScore``, ``RoundResult``, ``Task``); the
command-line tools fetch, this module writes. Record images come only from local files the user
passes (:class:`RecordImages`), never from the service: builders never read raw records through the
API (DESIGN.md section 5).

The page parts (record card, summary, stat cards, "how to read", tables) come from
:mod:`clients.score_html`, which the web client renders with too, so a report reads like the pages.

Reading a score: the headline is the model-based score 2Φ(d′/2) − 1 of the membership attack on the
record, from its IN and OUT statistic Gaussians fitted over the round's n models (0 = a coin flip,
1 = membership always identified), with its 95% interval; the paper's counted P = TPR − FPR over the
n yes/no decisions is shown next to it (noisier). Cards, ranking, summary, figures and tables use the
headline; ``scores.csv`` has every field of both.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from clients.api import score_dict
from clients.cli_common import InputError
from ftps.records.files import Expect
from ftps.records.images import is_image_shape
from ftps.records.npz import Records
from ftps.records.tabular import Schema, of_settings
from clients.score_html import (
    BADGE_CSS,
    LEVEL_FILL,
    SCORE_CSS,
    TABLE_CSS,
    TOP_RISK,
    card,
    comparison_done,
    comparison_table,
    contributions_table,
    contributors_table,
    dp_training_note,
    e,
    exposed_everywhere_html,
    headline,
    how_to_read,
    interval_svg,
    method_name,
    method_table,
    rank_key,
    reading,
    recipe_rows,
    record_card,
    record_reading,
    raw_row,
    records_table,
    risk_level,
    safe_name,
    stat_cards,
    summary_sentence,
    tabular_html,
)
from ftps.common.clock import iso
from ftps.v1 import common_pb2, registry_pb2

__all__ = ["ReportFiles", "RecordImages", "LEVEL_FILL", "SCORE_CSS", "BADGE_CSS", "reading", "risk_level",
           "interval_svg", "contributor_report", "builder_report", "write_scores_csv", "load_record_images"]

Progress = Callable[[int, int], None]


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
                raise InputError(f"{recs.source} has {len(recs.x)} records but record {record_id} is number "
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
                "reading": record_reading(s)}
            if w is None:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
            w.writerow(row)
        if w is None:
            csv.writer(f).writerow([*score_dict(common_pb2.RecordScore()), *_CSV_EXTRA, "reading"])
    return path


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

        rel = f"records/diag-{safe_name(s.record_id)}.png"
        report_plots.record_diagnosis_png(s, alpha=alpha, offline=offline, offline_hidden=offline_hidden,
                                          path=self.add(rel))
        return rel

    def scores(self, scores: Sequence[common_pb2.RecordScore], *, title: str) -> str:
        """Histogram of the headline scores and every record's headline interval."""
        from ftps.privacy import plots

        h = np.array([headline(s) for s in scores], dtype=float).reshape(-1, 3)
        rel = "scores.png"
        plots.scores_with_intervals_png(h[:, 0], h[:, 1], h[:, 2], path=self.add(rel), title=title,
                                        what="model-based score")
        return rel

    def thumbnail(self, record_id: str, images: RecordImages | None) -> str | None:
        from clients import report_plots

        if not images:
            return None
        x = images.get(record_id)
        if x is None:
            return None
        if not is_image_shape(x.shape):
            self.not_images = tuple(x.shape)
            return None
        rel = f"records/thumb-{safe_name(record_id)}.png"
        report_plots.thumbnail_png(x, self.add(rel))
        return rel

    def comparison(self, c: common_pb2.RecipeComparison) -> str | None:
        """The risk/utility plot of a recipe comparison; None before any recipe is DONE."""
        from clients import report_plots

        rel = f"comparison-{safe_name(c.round_id)}.png"
        if report_plots.comparison_png(recipe_rows(c), self.out_dir / rel,
                                       title=f"Recipes on round {c.round_id}: risk against utility") is None:
            return None
        self.written.append(self.out_dir / rel)
        return rel

    def record_view(self, record_id: str, images: RecordImages | None,
                    schema: Schema | None) -> tuple[str | None, str]:
        """What a record card shows of the record itself: (thumbnail path, "") for an image task,
        (None, the row's values and why it is exposed) for a tabular one."""
        if schema is not None:
            return None, self.tabular(record_id, images, schema)
        return self.thumbnail(record_id, images), ""

    def tabular(self, record_id: str, images: RecordImages | None, schema: Schema) -> str:
        """A tabular record's values and why it is exposed (with a bar plot of its z-scores), from
        the user's own file; "" when the record is not in it."""
        from clients import report_plots

        x = images.get(record_id) if images else None
        row = raw_row(schema, x) if x is not None else None
        if row is None:
            return ""
        rel = f"records/unusual-{safe_name(record_id)}.png"
        png = report_plots.unusual_png(schema.unusual(row), self.out_dir / rel)
        if png is not None:
            self.written.append(self.out_dir / rel)
        return tabular_html(schema, row, plot_src=rel if png is not None else None)


# -- html ---------------------------------------------------------------------------------------

_DIAG_WIDTH = 560  # the diagnosis plot's width on the page (the .record grid's third column)
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
"""+TABLE_CSS+"""figure{margin:12px 0;background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:8px}
figcaption{color:#5b6475;font-size:13px;padding:4px 6px}
.pair{display:grid;grid-template-columns:minmax(0,520px) minmax(0,1fr);gap:18px;align-items:start}
.pair th.num{white-space:normal}td.method{white-space:nowrap}
.record{display:grid;grid-template-columns:84px minmax(0,1fr) """ + str(_DIAG_WIDTH) + """px;gap:18px;background:#fff;
border:1px solid #e1e4ea;border-radius:8px;padding:14px 16px;margin:12px 0;align-items:center}
.record h3{margin:0 0 2px;font-size:15px;word-break:break-all}
.record .reading{margin:8px 0 6px;font-size:15px}
.record .facts{color:#5b6475;font-size:13px}
.rank{font-size:13px;color:#5b6475;font-weight:600;margin-right:6px}
"""+SCORE_CSS+BADGE_CSS+"""svg.iv{vertical-align:middle}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
footer{color:#7a8294;font-size:12px;margin-top:40px}
@media (max-width:980px){.record{grid-template-columns:84px minmax(0,1fr)}
.record .diag{grid-column:1/-1}.pair{grid-template-columns:1fr}}
"""

def _page(title: str, body: str) -> str:
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body><main>\n{body}\n"
            f"<footer>FT-PrivacyScore report, generated {generated}. Scores: LiRA membership inference "
            "on fine-tuned models (Carlini et al. S&amp;P'22; FT-PrivacyScore, Gu et al. CCS'24 demo).</footer>"
            "</main></body></html>\n")


def _write(out_dir: Path, page: str, csv_path: Path, pngs: list[Path], n_records: int) -> ReportFiles:
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return ReportFiles(html_path, csv_path, pngs, n_records)


def _notes(notes: Sequence[str]) -> str:
    notes = [n for n in notes if n]
    if not notes:
        return ""
    return '<div class="box warn">' + "".join(f"<p>{e(n)}</p>" for n in notes) + "</div>"


def _thumb_missing_text(images: RecordImages | None, figs: _Figures) -> str:
    if figs.not_images:
        return "not an image"
    return "no image" if not images else "not in file"


# -- contributor --------------------------------------------------------------------------------

def contributor_report(out_dir: Path, *, task_id: str, contributor: str, scores: Sequence[common_pb2.RecordScore],
                       task: registry_pb2.Task | None = None, images: RecordImages | None = None,
                       notes: Sequence[str] = (), progress: Progress | None = None,
                       contributions: Sequence[common_pb2.ContributorScore] = ()) -> ReportFiles:
    """A contributor's page: a summary, then per record (highest score first) its score with the
    interval, a one-line reading, the diagnosis plot and, given ``images``, a thumbnail.
    ``contributions`` (a task with contributor-level masks: ``GetScoresResponse.contributor_scores``):
    the score of the contributor's whole contribution per round, after the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out_dir)
    notes = list(notes)
    if images:
        notes.append(images.check_submissions(s.record_id for s in scores))
    alpha = (task.settings.alpha if task is not None else 0.0) or 0.05
    name = task.name if task is not None and task.name else task_id
    who = contributor or "you"
    title = f"Privacy report — {who}, task {name}"
    ordered = sorted(scores, key=rank_key)
    schema = of_settings(task.settings) if task is not None else None
    cards = []
    for k, s in enumerate(ordered):
        diag = figs.diagnosis(s, alpha=alpha, offline=None, offline_hidden=True)
        cards.append((s, diag, *figs.record_view(s.record_id, images, schema)))
        if progress:
            progress(k + 1, len(ordered))
    if schema is not None and not images:
        notes.append("No record values: pass --records with the table you submitted (.csv or .parquet) to see "
                     "each row next to its score, with the columns that make it unusual.")
    elif images and figs.not_images:
        notes.append(f"records of shape {figs.not_images} are not images: no thumbnails.")
    elif not images:
        notes.append("No record images: pass --records with the file you submitted (an .npz or a folder "
                     "of images with labels.csv) to see each record next to its score.")
    csv_path = write_scores_csv(out_dir / "scores.csv", sorted(scores, key=lambda s: (s.round_id, s.index)))

    head = (f"<h1>Privacy report for {e(who)}</h1><p class=\"sub\">Task <b>{e(name)}</b> "
            f"(<span class=\"mono\">{e(task_id)}</span>) — your records only.</p>")
    if not scores:
        body = head + ('<div class="box"><p>No scores yet: your records are waiting for a round (a round '
                       "starts when the task has enough pending records, or when the builder starts one)."
                       "</p></div>")
        return _write(out_dir, _page(title, body), csv_path, [], 0)

    methods = sorted({method_name(s.method) for s in scores})
    n_models = {s.n_in + s.n_out for s in scores}
    rounds = sorted({s.round_id for s in scores})
    figure = ""
    if len(scores) >= 2:
        rel = figs.scores(scores, title=f"Your {len(scores)} records, task {name}")
        figure = (f'<figure><img src="{rel}" alt="histogram of your scores and every record\'s interval">'
                  "<figcaption>Left: how your records' (model-based) scores spread. Right: every record's "
                  "score with its 95% interval, sorted; red where the whole interval is above 0.</figcaption>"
                  "</figure>")
    missing = _thumb_missing_text(images, figs)
    body = (head + "<h2>Summary</h2>" + summary_sentence(scores, "your")
            + stat_cards(scores, [card(", ".join(rounds), "round" + ("s" if len(rounds) > 1 else ""), small=True)])
            + f"<p class=\"sub\">Method {e(', '.join(methods))}; "
              f"{', '.join(str(n) for n in sorted(n_models))} fine-tuned models per round.</p>"
            + _contributions_section(contributions, builder=False)
            + _notes(notes) + "<h2>How to read this page</h2>" + how_to_read(scores, builder=False, collapsed=False)
            + figure + f"<h2>Your records, highest score first ({len(scores)})</h2>"
            + "".join(record_card(s, thumb_src=t, diag_src=d, diag_width=_DIAG_WIDTH, thumb_missing=missing,
                                  row_html=row) for s, d, t, row in cards))
    return _write(out_dir, _page(title, body), csv_path, figs.written, len(scores))


# -- builder ------------------------------------------------------------------------------------

def _roc_label(b: common_pb2.BatchMetrics, lead: bool) -> str:
    # Short: the table next to the plot has every number.
    return f"{method_name(b.method)}{' ★' if lead else ''}  AUC={b.auc:.2f}"


def _round_section(rid: str, result: common_pb2.RoundResult, figs: _Figures) -> str:
    from ftps.privacy import plots

    metrics = list(result.method_metrics) or ([result.batch] if result.HasField("batch") else [])
    lead = result.batch.method
    n = result.batch.n_models
    m = result.batch.n_records or result.status.n_records
    parts = [f"<h3>Round <span class=\"mono\">{e(rid)}</span> — {m} records, {n} models</h3>"]
    curves = [(_roc_label(b, b.method == lead), b.roc_fpr, b.roc_tpr) for b in metrics if len(b.roc_fpr)]
    roc = ""
    if curves:
        rel = f"roc-{safe_name(rid)}.png"
        plots.roc_curves_png(curves, title=f"ROC of every method, round {rid} (n={n}, m={m})", path=figs.add(rel))
        roc = f'<figure><img src="{e(rel)}" alt="log-log ROC of every method, round {e(rid)}"></figure>'
    table = (method_table(metrics, lead)
             + "<p class=\"sub\">★ the headline method (the task's setting); every method scores the same "
             "fine-tuned models, no extra training.</p>")
    names = {method_name(b.method) for b in metrics}
    extra = []
    if result.HasField("offline") and result.offline.k:
        o = result.offline
        extra.append(f"Offline Gaussian (the paper's offline-global attack): mu = {o.mu:.3f}, sigma = {o.sigma:.3f} "
                     f"from k = {o.k} shadow models, fitted {e(iso(o.fitted_at))}.")
    elif "offline-global" not in names:
        extra.append("offline-global is not in this round: the task had no offline Gaussian "
                     "(run <code>ftps-builder prepare</code> before the round).")
    if result.dp_epsilon:
        extra.append(e(dp_training_note(result)))
    out_pairs = sum(s.n_out for s in result.scores)
    if out_pairs and 1 / out_pairs > 0.001:
        extra.append(f"With {out_pairs} OUT (model, record) pairs the lowest measurable false positive rate is "
                     f"{1 / out_pairs:.2%}: below it the TPR columns are read at FPR 0 (more models or "
                     "records resolve lower rates).")
    if result.timings:
        extra.append("Timings: " + ", ".join(f"{e(k)} {v:.1f} s" for k, v in sorted(result.timings.items())) + ".")
    if not metrics:
        table = f"<p>No batch metrics: the round is {e(_state(result.status.state))}.</p>"
    return "".join(parts) + f'<div class="pair"><div>{roc}</div><div>{table}' + "".join(
        f'<p class="sub">{x}</p>' for x in extra) + "</div></div>"


def _contributions_section(contributions: Sequence[common_pb2.ContributorScore], *, builder: bool) -> str:
    """Each whole contribution's score (contributor-level masks); "" for a task without them."""
    if not contributions:
        return ""
    whose = "each contributor's" if builder else "your"
    return ("<h2>Whole contributions (contributor-level masks)</h2><p class=\"sub\">This task puts all of a "
            f"contributor's records in or out of each model together, so the attack also scored {whose} whole "
            "contribution as one unit (user-level membership inference): the score with its 95% interval, and the "
            "empirical ε with its interval at δ — what this attack measured, not a guarantee.</p>"
            + contributions_table(contributions))


def _comparison_section(c: common_pb2.RecipeComparison, figs: _Figures) -> str:
    """A round's recipe comparison: the risk/utility table, the plot and the records exposed under
    every recipe (once every recipe has ended, as the web batch view)."""
    rel = figs.comparison(c) if comparison_done(c) else None
    plot = (f'<figure><img src="{e(rel)}" alt="risk against utility of each recipe, round {e(c.round_id)}">'
            "<figcaption>One point per recipe: held-out accuracy against the mean score (left) and the records "
            "identifiable above chance (right). Down and to the right is better.</figcaption></figure>"
            if rel else "")
    return (f"<h2>Recipes compared on round <span class=\"mono\">{e(c.round_id)}</span></h2><p class=\"sub\">"
            "The round's batch fine-tuned again under each recipe, with the same masks and seeds: what each "
            "costs in accuracy on held-out builder data, and what it does to the records' exposure.</p>"
            + comparison_table(c) + plot + exposed_everywhere_html(c))


def _state(state: int) -> str:
    return common_pb2.RoundState.Name(state).removeprefix("ROUND_STATE_").lower()


def builder_report(out_dir: Path, *, task_id: str, scores: Sequence[common_pb2.RecordScore],
                   rounds: dict[str, common_pb2.RoundResult], task: registry_pb2.Task | None = None,
                   images: RecordImages | None = None, notes: Sequence[str] = (),
                   progress: Progress | None = None, top: int = TOP_RISK,
                   comparisons: dict[str, common_pb2.RecipeComparison] | None = None) -> ReportFiles:
    """The builder's batch view: score histogram and intervals, per round the log-log ROC and the
    metrics of every method, the highest-risk records (diagnosis plots, thumbnails from local files
    only) and a table of every record. Rounds of a task with contributor-level masks add each whole
    contribution's score (``RoundResult.contributor_scores``); ``comparisons`` (round id -> its
    ``GetComparison``, rounds without one left out) add the recipes' risk/utility table and plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out_dir)
    notes = list(notes)
    alpha = (task.settings.alpha if task is not None else 0.0) or 0.05
    name = task.name if task is not None and task.name else task_id
    title = f"Batch privacy report — task {name}"
    csv_path = write_scores_csv(out_dir / "scores.csv", sorted(scores, key=lambda s: (s.round_id, s.index)))
    owner = f", owner {e(task.owner)}" if task is not None and task.owner else ""
    head = (f"<h1>Batch privacy report</h1><p class=\"sub\">Task <b>{e(name)}</b> "
            f"(<span class=\"mono\">{e(task_id)}</span>{owner}) — every contributor's records.</p>")
    if not scores:
        body = head + '<div class="box"><p>No scored records yet: no round of this task has finished.</p></div>'
        return _write(out_dir, _page(title, body), csv_path, [], 0)

    methods = sorted({method_name(s.method) for s in scores})
    n_models = {s.n_in + s.n_out for s in scores}
    contributors = sorted({s.contributor for s in scores})
    scores_png = figs.scores(scores, title=f"Privacy scores, task {name} ({', '.join(methods)})")
    ranked = sorted(scores, key=rank_key)
    risky = ranked[:top]
    schema = of_settings(task.settings) if task is not None else None
    rows = []
    for k, s in enumerate(risky):
        r = rounds.get(s.round_id)
        offline = (r.offline.mu, r.offline.sigma) if r is not None and r.HasField("offline") and r.offline.k else None
        diag = figs.diagnosis(s, alpha=alpha, offline=offline)
        rows.append((s, diag, *figs.record_view(s.record_id, images, schema)))
        if progress:
            progress(k + 1, len(risky))
    if schema is not None and not images:
        notes.append("No record values: the service never gives a builder raw records (DESIGN.md §5). Pass "
                     "--records with your own local copy of the batch (a .csv or .parquet with a record_id "
                     "column, or SUBMISSION_ID=FILE per submission) to see each row and why it is exposed.")
    elif not images:
        notes.append("No record thumbnails: the service never gives a builder raw records (DESIGN.md §5). "
                     "Pass --records with your own local copy of the batch (an .npz or a folder of images; "
                     "SUBMISSION_ID=FILE per submission, or a file with a record_id array/column) to see them.")
    elif figs.not_images:
        notes.append(f"records of shape {figs.not_images} are not images: no thumbnails.")
    missing = _thumb_missing_text(images, figs)
    headline_auc = [r.batch.auc for r in rounds.values() if r.HasField("batch") and r.batch.n_models]
    n_rounds = len(rounds) or len({s.round_id for s in scores})
    extra_cards = [card(str(len(contributors)), "contributors"), card(str(n_rounds), "rounds")]
    if headline_auc:
        extra_cards.append(card(f"{np.mean(headline_auc):.2f}", "batch AUC (headline)"))
    round_ids = sorted(rounds) or sorted({s.round_id for s in scores})
    body = (
        head + "<h2>Summary</h2>" + summary_sentence(scores, "the") + stat_cards(scores, extra_cards)
        + f"<p class=\"sub\">Method {e(', '.join(methods))}; {', '.join(str(n) for n in sorted(n_models))} "
          f"fine-tuned models per round; contributors {e(', '.join(contributors))}.</p>"
        + _notes(notes) + "<h2>How to read this page</h2>" + how_to_read(scores, builder=True, collapsed=False)
        + f"<h2>Scores of the batch</h2><figure><img src=\"{scores_png}\" alt=\"score histogram and intervals\">"
          "<figcaption>Left: histogram of the records' (model-based) scores. Right: every record's score with "
          "its 95% interval, sorted; red where the whole interval is above 0.</figcaption></figure>"
        + "<h2>Attack strength, every method</h2>"
        + "".join(_round_section(rid, rounds[rid], figs) if rid in rounds
                  else f"<h3>Round {e(rid)}</h3><p>Round details unavailable.</p>" for rid in round_ids)
        + "".join(_comparison_section(comparisons[rid], figs) for rid in round_ids if rid in (comparisons or {}))
        + "<h2>Contributors</h2>" + contributors_table(scores)
        + _contributions_section([c for rid in round_ids if rid in rounds for c in rounds[rid].contributor_scores],
                                 builder=True)
        + f"<h2>Highest-risk records (top {len(rows)} by score)</h2>"
        + "".join(record_card(s, thumb_src=t, diag_src=d, diag_width=_DIAG_WIDTH, thumb_missing=missing,
                              rank=k + 1, show_contributor=True, row_html=row)
                  for k, (s, d, t, row) in enumerate(rows))
        + f"<h2>All records ({len(scores)})</h2><details open><summary>every record, highest score first</summary>"
        + records_table(ranked, readings=True) + "</details>")
    return _write(out_dir, _page(title, body), csv_path, figs.written, len(scores))


def load_record_images(specs: Sequence[str], expect: Expect | None = None) -> RecordImages:
    """``--records`` values (``PATH`` or ``SUBMISSION_ID=PATH``; any format ``ftps.records.files``
    reads) -> RecordImages."""
    from clients.cli_common import records_arg
    from ftps.records import files

    images = RecordImages()
    for spec in specs:
        sub, path = records_arg(spec)
        if not path.exists():
            raise InputError(f"--records {spec}: {path} not found")
        images.add(sub, files.load(path, expect))
    return images
