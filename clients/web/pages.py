"""The web client's pages: Jinja2 templates (``clients/web/templates``, autoescaped) rendered from
what the services returned (protobuf messages) and the session's own state. No inline script or
style (the server sends a strict Content-Security-Policy); the token never appears. Scores (record
cards, summary, stat cards, "how to read", tables) are rendered by :mod:`clients.score_html`, as
in the HTML reports (its output is escaped HTML, marked safe where a template inserts it): the
headline is the model-based score with its 95% interval.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import jinja2
import numpy as np
from markupsafe import Markup

from clients import score_html
from clients.score_html import (
    card,
    method_name,
    rank_key,
    raw_row,
    record_card,
    tabular_html,
)
from clients.web import assets
from clients.web.session import (
    Job,
    RoundView,
    Session,
    SubmissionView,
    round_state,
    submission_state,
)
from ftps.common.clock import iso
from ftps.records.tabular import Schema, of_settings
from ftps.v1 import common_pb2, gateway_pb2, registry_pb2

__all__ = ["CREATE_DEFAULTS", "batch_page", "builder_task_page", "contributor_task_page", "error_page",
           "method_name", "signin_page", "tasks_page"]

METHODS = {
    "online-per-record": "online-per-record — per-record IN and OUT Gaussians from the round's own models (default)",
    "offline-per-record": "offline-per-record — per-record OUT Gaussian, leave-one-model-out",
    "offline-global": "offline-global — the paper's single offline Gaussian (preparation stage)",
    "rmia": "rmia — RMIA with the round's OUT models as references",
}
CREATE_DEFAULTS = {"name": "", "dataset": "fashion-mnist", "record_shape": "", "num_classes": "10", "n_models": "32",
                   "batch_threshold": "200", "shadow_models": "16", "models_per_job": "4",
                   "method": "online-per-record", "alpha": "0.05", "seed": "0", "builder_mix": "0",
                   "fixed_variance": "", "dp_delta": "1e-5", "mask_unit": "record"}
MASK_UNITS = {
    "record": "records — each record in or out of a model on its own (default)",
    "contributor": "contributors — all of a contributor's records in or out together",
}
MAX_RECIPES = 4  # alternatives per recipe comparison (CompareRecipes takes 1 to 4)
SAMPLE_COLUMNS = 3  # columns of a tabular sample set shown per row
RESULTS_PER_PAGE = 20  # record cards per page of a contributor's results (each card is ~300 px tall)

_STATUS_NAMES = {c.name for c in grpc.StatusCode}


def u(value: object) -> str:
    """A path segment."""
    return quote(str(value), safe="")


def status_parts(text: str) -> tuple[str, str]:
    """A gRPC error's text ("STATUS: details" or "STATUS [REASON]: details") -> (status, details);
    ("", text) for any other message."""
    code, sep, rest = text.partition(": ")
    if sep and code.partition(" [")[0] in _STATUS_NAMES:
        return code, rest
    return "", text


def size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _safe(fn: Callable[..., str]) -> Callable[..., Markup]:
    """A score_html renderer for templates: its output is already escaped HTML."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Markup:
        return Markup(fn(*args, **kwargs))
    return wrapper


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["u"] = u
    env.globals.update(
        iso=iso, method_name=method_name, submission_state=submission_state, round_state=round_state,
        status_parts=status_parts,
        size_text=size_text, once_key=lambda: secrets.token_hex(8),
        dp_training_note=score_html.dp_training_note,  # plain text: autoescaped where it is put
        contributor_masks=lambda settings: settings.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR,
        **{name: _safe(getattr(score_html, name)) for name in (
            "summary_sentence", "stat_cards", "how_to_read", "method_table", "contributors_table", "records_table",
            "contributions_table", "comparison_table", "exposed_everywhere_html")})
    env.globals["m"] = env.get_template("_macros.html").module
    return env


def render(template: str, session: Session | None, **context: Any) -> str:
    context.setdefault("events", "")
    return _env().get_template(template).render(session=session, **context)


def error_page(session: Session | None, title: str, message: str) -> str:
    return render("error.html", session, title=title, message=message)


def signin_page(session: Session) -> str:
    return render("signin.html", session, title="Sign in")


def tasks_page(session: Session, tasks: Sequence[registry_pb2.Task], error: str = "") -> str:
    # A refused create form comes back with what was entered.
    form = {**CREATE_DEFAULTS, **session.forms.pop("create", {})}
    datasets = [(d, f"{d} ({'×'.join(map(str, assets.DATASET_SHAPES[d]))})") for d in ("fashion-mnist", "digits")]
    datasets += [(d, f"{d} (tabular rows, its demo schema)") for d in assets.TABULAR_DEMOS]
    return render("tasks.html", session, title="Tasks", tasks=tasks, error=error, form=form, datasets=datasets,
                  methods=METHODS, mask_units=MASK_UNITS)


def web_record_card(tid: str, s: common_pb2.RecordScore, has_thumb: bool, *, open_diag: bool = True,
                    rank: int = 0, contributor: bool = False, row_html: str = "") -> Markup:
    """The shared record card with this server's figure URLs; a closed diagnosis loads lazily.
    ``row_html``: a tabular record's values and why it is exposed, instead of a thumbnail."""
    base = f"/tasks/{u(tid)}/records/{u(s.record_id)}"
    return Markup(record_card(s, thumb_src=f"{base}/thumb.png" if has_thumb else None,
                              diag_src=f"{base}/diagnosis.png?round={u(s.round_id)}", diag_width=500,
                              diag_collapsed=not open_diag, rank=rank, show_contributor=contributor,
                              row_html=row_html))


def row_html(schema: Schema | None, x: np.ndarray | None, tid: str, rid: str) -> str:
    """A tabular record's part of its card, from the user's own copy of it ("" for an image task or
    a record this session does not hold)."""
    if schema is None or x is None:
        return ""
    row = raw_row(schema, x)
    if row is None:
        return ""
    # The bar plot draws z-scores: none when the row's most unusual columns are all categorical.
    plot = any(c["z"] is not None for c in schema.unusual(row))
    return tabular_html(schema, row, plot_src=f"/tasks/{u(tid)}/records/{u(rid)}/unusual.png" if plot else None)


def ended_rounds(scores: Sequence[common_pb2.RecordScore], followed: Sequence[RoundView]) -> list[tuple[str, int]]:
    """(round id, records) of the rounds that scored these records and that this session did not
    follow live (started elsewhere, or ended before the page looked): shown as done, like a followed one."""
    seen = {r.round_id for r in followed}
    counts: dict[str, int] = {}
    for x in scores:
        if x.round_id not in seen:
            counts[x.round_id] = counts.get(x.round_id, 0) + 1
    return sorted(counts.items())


def contributor_task_page(session: Session, t: registry_pb2.Task, scores: Sequence[common_pb2.RecordScore],
                          *, dataset: str | None, page: int, subs: Sequence[SubmissionView],
                          rounds: Sequence[RoundView], scores_error: str = "", results_page: int = 0,
                          contributions: Sequence[common_pb2.ContributorScore] = ()) -> str:
    gallery = None
    schema = of_settings(t.settings)
    if dataset:
        x, y = assets.contributor_pool(dataset)
        picks = assets.sample_page(dataset, page)
        gallery = {"dataset": dataset, "page": page, "pages": assets.sample_pages(dataset),
                   "samples": [(i, int(y[i])) for i in picks], "rows": None}
        if schema is not None:
            # Rows, not thumbnails: a table of the first columns (the label, then the values).
            shown = range(min(len(schema.features), SAMPLE_COLUMNS))
            gallery["columns"] = [schema.features[j].name for j in shown]
            gallery["rows"] = [(i, schema.label_text(int(y[i])), [schema.cell_text(j, x[i][j]) for j in shown])
                               for i in picks]
    own = {rid for v in subs for rid in v.record_ids}
    # The contributor's raw rows as submitted, for a tabular task's cards.
    rows = {rid: v.x[i] for v in subs for i, rid in enumerate(v.record_ids)} if schema is not None else {}
    cards: list[Markup] = []
    pager = None
    if scores and not scores_error:
        ordered = sorted(scores, key=rank_key)
        # A page of cards at a time: 50 records on one page was over 15,000 pixels tall.
        pages = -(-len(ordered) // RESULTS_PER_PAGE)
        results_page = min(max(results_page, 0), pages - 1)
        start = results_page * RESULTS_PER_PAGE
        shown = ordered[start:start + RESULTS_PER_PAGE]
        if pages > 1:
            pager = {"page": results_page, "pages": pages, "first": start + 1, "last": start + len(shown),
                     "total": len(ordered)}
        cards = [web_record_card(t.task_id, s, s.record_id in own and schema is None, open_diag=k < 20,
                                 row_html=row_html(schema, rows.get(s.record_id), t.task_id, s.record_id))
                 for k, s in enumerate(shown)]
    return render("contributor_task.html", session, title=f"{t.name} — contributor", t=t, scores=list(scores),
                  schema=schema,
                  gallery=gallery, gallery_page=page, subs=subs, rounds=rounds, ended=ended_rounds(scores, rounds),
                  scores_error=scores_error, own=own, cards=cards, pager=pager, contributions=list(contributions),
                  events=f"/tasks/{u(t.task_id)}/events")


def builder_task_page(session: Session, t: registry_pb2.Task, *, dataset: str | None,
                      offline: common_pb2.OfflineGaussian | None, offline_note: str,
                      jobs: Sequence[Job], rounds: Sequence[RoundView], scored: gateway_pb2.GetScoresResponse | None,
                      scores_error: str = "", estimate: str = "") -> str:
    strategies = [(name, assets.shipped_recipe(name)) for name in assets.shipped_strategies()]
    batches = []
    if scored is not None:
        batches = list(zip(sorted({s.round_id for s in scored.scores}), scored.batches, strict=False))
    return render("builder_task.html", session, title=f"{t.name} — builder", t=t, dataset=dataset, offline=offline,
                  offline_note=offline_note, jobs=jobs, rounds=rounds, scored=scored, scores_error=scores_error,
                  estimate=estimate, strategies=strategies, editable=assets.EDITABLE,
                  default_strategy=assets.DEFAULT_STRATEGY.get(dataset or "", ""),
                  builder_data_max=assets.BUILDER_DATA_MAX, batches=batches, schema=of_settings(t.settings),
                  ended=ended_rounds(scored.scores, rounds) if scored is not None else [],
                  events=f"/tasks/{u(t.task_id)}/events")


def batch_page(session: Session, t: registry_pb2.Task, scored: gateway_pb2.GetScoresResponse,
               rounds: dict[str, common_pb2.RoundResult], *, round_filter: str = "",
               comparisons: dict[str, common_pb2.RecipeComparison] | None = None,
               jobs: Sequence[Job] = (), followed: Sequence[RoundView] = ()) -> str:
    """The builder's batch view. Per round: its metrics, each whole contribution's score
    (contributor-level masks), the forms to grow it and to compare recipes on it, and its recipe
    comparison (``comparisons``: round id -> GetComparison, rounds without one left out). ``jobs``
    and ``followed``: this session's work on the task, streamed live."""
    scores = [s for s in scored.scores if not round_filter or s.round_id == round_filter]
    ranked = sorted(scores, key=rank_key)
    contributors = {s.contributor for s in scores}
    aucs = [r.batch.auc for r in rounds.values() if r.HasField("batch") and r.batch.n_models]
    extra_cards = [card(str(len(contributors)), "contributors"), card(str(len(rounds)), "rounds")] + (
        [card(f"{np.mean(aucs):.2f}", "batch AUC (headline)")] if aucs else [])
    comparisons = comparisons or {}
    by_round = [(rid, rounds[rid], list(rounds[rid].method_metrics)
                 or ([rounds[rid].batch] if rounds[rid].HasField("batch") else []), comparisons.get(rid))
                for rid in sorted(rounds)]
    have = session.local_records
    schema = of_settings(t.settings)
    cards = [web_record_card(t.task_id, s, s.record_id in have and schema is None, rank=k + 1, contributor=True,
                             row_html=row_html(schema, have[s.record_id][0] if s.record_id in have else None,
                                              t.task_id, s.record_id))
             for k, s in enumerate(ranked[:score_html.TOP_RISK])]
    return render("batch.html", session, title=f"{t.name} — batch view", t=t, scores=scores, ranked=ranked,
                  schema=schema,
                  round_filter=round_filter, extra_cards=extra_cards, rounds=by_round, cards=cards,
                  jobs=jobs, followed=followed, comparison_done=score_html.comparison_done,
                  max_recipes=MAX_RECIPES, events=f"/tasks/{u(t.task_id)}/events")
