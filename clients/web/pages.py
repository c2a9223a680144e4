"""HTML of the web client's pages: plain functions from what the services returned (protobuf
messages) and the session's own state to a string. Every value is escaped; no inline script or
style (the server sends a strict Content-Security-Policy); the token never appears. Scores (record
cards, summary, stat cards, "how to read", tables) are rendered by :mod:`clients.score_html`, as
in the HTML reports: the headline is the model-based score with its 95% interval.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from urllib.parse import quote

import grpc
import numpy as np

from clients.score_html import (
    TOP_RISK,
    card,
    contributors_table,
    e,
    how_to_read,
    method_name,
    method_table,
    rank_key,
    record_card,
    records_table,
    stat_cards,
    summary_sentence,
)
from clients.web import assets
from clients.web.session import (
    Job,
    RoundView,
    Session,
    SubmissionView,
    submission_state,
)
from ftps.common.clock import iso
from ftps.v1 import common_pb2, gateway_pb2, registry_pb2

METHODS = {
    "online-per-record": "online-per-record — per-record IN and OUT Gaussians from the round's own models (default)",
    "offline-per-record": "offline-per-record — per-record OUT Gaussian, leave-one-model-out",
    "offline-global": "offline-global — the paper's single offline Gaussian (preparation stage)",
    "rmia": "rmia — RMIA with the round's OUT models as references",
}


def u(value: str) -> str:
    """A path segment."""
    return quote(str(value), safe="")


# -- frame --------------------------------------------------------------------------------------

def layout(title: str, body: str, session: Session | None, *, events: str = "") -> str:
    nav = who = ""
    if session is not None and session.signed_in:
        view = "contributor" if session.is_contributor else "builder"
        nav = '<nav><a href="/tasks">Tasks</a></nav>'
        who = (f'<span class="who">signed in as <b>{e(session.subject)}</b> ({e(session.role)}, {view} view)</span>'
               f'<form method="post" action="/signout">{csrf_field(session)}'
               '<button type="submit">Sign out</button></form>')
    else:
        nav = "<nav></nav>"
    flashes = ""
    if session is not None:
        flashes = "".join(flash_html(kind, text) for kind, text in session.take_flashes())
    ev = f' data-events="{e(events)}"' if events else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)} — FT-PrivacyScore</title><link rel=\"stylesheet\" href=\"/static/app.css\"></head>"
            f"<body{ev}><header class=\"top\"><a class=\"brand\" href=\"/\">FT-PrivacyScore</a>{nav}{who}</header>"
            f"<main>{flashes}{body}<footer>FT-PrivacyScore — per-record privacy scores of fine-tuning by batched "
            "LiRA membership inference (Gu et al., CCS'24 demo; Carlini et al., S&amp;P'22). This page talks to "
            "the services with your token; it shows only what the token may see.</footer></main>"
            "<script src=\"/static/app.js\"></script></body></html>\n")


def csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{e(session.csrf)}">'


_STATUS_NAMES = {c.name for c in grpc.StatusCode}


def once_field() -> str:
    """A fresh key per rendered form: a submit sent twice (double click, retry) is stored once."""
    return f'<input type="hidden" name="once" value="{secrets.token_hex(8)}">'


def flash_html(kind: str, text: str) -> str:
    """A message; a gRPC error ("STATUS: details" or "STATUS [REASON]: details") shows its status
    name (and reason) apart."""
    code, sep, rest = text.partition(": ")
    if sep and code.partition(" [")[0] in _STATUS_NAMES:
        return f'<div class="flash {e(kind)}" role="alert"><span class="code">{e(code)}</span>{e(rest)}</div>'
    return f'<div class="flash {e(kind)}" role="{"alert" if kind == "error" else "status"}">{e(text)}</div>'


def error_page(session: Session | None, title: str, message: str) -> str:
    return layout(title, f"<h1>{e(title)}</h1>{flash_html('error', message)}"
                         '<p><a href="/tasks">Back to the tasks</a></p>', session)


# -- small parts --------------------------------------------------------------------------------

def live_row(item: dict, *, key: str | None = None) -> str:
    """A progress row the page's script updates from the event stream."""
    total = int(item.get("total") or 0)
    value = f' max="{total}" value="{int(item.get("done") or 0)}"' if total else ""
    state = item["state"]
    bar = f"<progress{value}></progress>" if state not in ("done", "failed") else "<progress max=\"1\" value=\"1\"></progress>"
    return (f'<div class="progress" data-live="{e(key or item["key"])}" data-state="{e(state)}">'
            f'<span class="state {e(state)}">{e(item.get("state_label") or state)}</span>'
            f'<span class="label">{e(item.get("text", ""))}</span>{bar}'
            f'<span class="count">{e(item.get("count", ""))}</span></div>')


def job_rows(jobs: Iterable[Job]) -> str:
    out = []
    for j in jobs:
        out.append(live_row(j.item()))
        if j.state == "done" and j.message:
            out.append(f'<p class="note">✓ {e(j.message)}</p>')
        elif j.state == "failed":
            out.append(flash_html("error", f"{j.text}: {j.message}" if ": " not in j.message else j.message))
    return "".join(out)


def settings_line(t: registry_pb2.Task) -> str:
    s = t.settings
    shape = "×".join(str(d) for d in s.record_shape)
    return (f"n = {s.n_models} fine-tuned models per round · a round starts at m = {s.batch_threshold} records · "
            f"method {e(method_name(s.method))} (α = {s.alpha or 0.05:g}) · k = {s.shadow_models} shadow models · "
            f"records {e(shape)}, {s.num_classes} classes · empirical ε at δ = {s.dp_delta or 1e-5:g}")


def upload_progress() -> str:
    return ('<div class="progress upload-progress" hidden><span class="label">sending the file to the web '
            'server</span><progress></progress><span class="count"></span></div>')


# -- sign in, tasks -----------------------------------------------------------------------------

def signin_page(session: Session) -> str:
    body = (
        '<div class="signin"><h1>Sign in</h1><p class="sub">Paste the token you were given '
        '(<code>ftps-stack token --role contributor --subject NAME</code> on the embedded stack). '
        "It stays on this server for your session and is sent to the services with every call; "
        "the pages never show it again.</p>"
        f'<form method="post" action="/signin" class="panel">{csrf_field(session)}'
        '<label for="token">Token</label>'
        '<input type="password" id="token" name="token" autocomplete="off" required>'
        '<button type="submit">Sign in</button></form>'
        '<div class="panel"><h3>What you can do</h3><ul>'
        "<li><b>Data contributors</b> pick a task, submit records (from the task's public sample set or an "
        ".npz file), watch the scoring round live and read each record's privacy score, its 95% "
        "interval, what it means and a diagnosis plot.</li>"
        "<li><b>Model builders</b> create a task, upload a base model, a fine-tuning strategy and "
        "training-distribution data, run the preparation stage (the offline Gaussian), start rounds "
        "and read the batch view.</li></ul></div></div>")
    return layout("Sign in", body, session)


def tasks_page(session: Session, tasks: Sequence[registry_pb2.Task], error: str = "") -> str:
    rows = "".join(
        f'<tr><td><a href="/tasks/{u(t.task_id)}">{e(t.name or t.task_id)}</a></td>'
        f'<td class="mono">{e(t.task_id)}</td><td>{e(t.owner)}</td>'
        f'<td>{"ready" if t.ready else "waiting for uploads"}</td><td class="num">{t.settings.n_models}</td>'
        f'<td class="num">{t.settings.batch_threshold}</td><td>{e(method_name(t.settings.method))}</td>'
        f'<td>{e(iso(t.created_at)[:16].replace("T", " "))}</td></tr>' for t in tasks)
    table = ('<table><tr><th>task</th><th>id</th><th>owner</th><th>status</th><th class="num">n models</th>'
             '<th class="num">m records</th><th>method</th><th>created</th></tr>' + rows + "</table>") if tasks else (
        '<div class="panel"><p>No tasks ' + ("you may see yet." if session.is_contributor else
                                             "yet: create one below.") + "</p></div>")
    if error:
        table = flash_html("error", error)
    who = ("Choose a task to submit records to and read your scores."
           if session.is_contributor else "Your modelling tasks. Open one to upload assets, prepare and run rounds.")
    body = f"<h1>Tasks</h1><p class=\"sub\">{who}</p>{table}"
    if not session.is_contributor:
        body += create_task_form(session)
    return layout("Tasks", body, session)


CREATE_DEFAULTS = {"name": "", "dataset": "fashion-mnist", "record_shape": "", "num_classes": "10", "n_models": "32",
                   "batch_threshold": "200", "shadow_models": "16", "models_per_job": "4",
                   "method": "online-per-record", "alpha": "0.05", "seed": "0", "builder_mix": "0",
                   "fixed_variance": "", "dp_delta": "1e-5"}


def create_task_form(session: Session) -> str:
    """The builder's task settings (the paper's "number of models" and "dataset option"); after a
    refusal it comes back with what was entered."""
    v = {**CREATE_DEFAULTS, **session.forms.pop("create", {})}

    def num(name: str, label: str, extra: str = "", cls: str = "") -> str:
        c = f' class="{cls}"' if cls else ""
        return (f'<div{c}><label for="{name}">{label}</label><input type="number" id="{name}" name="{name}" '
                f'value="{e(v[name])}" {extra}></div>')

    def opt(value: str, label: str, current: str) -> str:
        return f'<option value="{e(value)}"{" selected" if value == current else ""}>{e(label)}</option>'

    datasets = "".join(opt(d, f'{d} ({"×".join(map(str, assets.DATASET_SHAPES[d]))})', v["dataset"])
                       for d in ("fashion-mnist", "digits"))
    datasets += opt("custom", "my own records (give the shape)", v["dataset"])
    methods = "".join(opt(k, text, v["method"]) for k, text in METHODS.items())
    checked = " checked" if v["fixed_variance"] == "1" else ""
    return (
        '<h2>Create a task</h2><form method="post" action="/tasks" class="panel">' + csrf_field(session)
        + '<div class="fields"><div><label for="name">Name</label><input type="text" id="name" name="name" '
          f'value="{e(v["name"])}" placeholder="e.g. fashion-mnist demo" required></div>'
        f'<div><label for="dataset">Dataset option</label><select id="dataset" name="dataset">{datasets}</select></div>'
        '<div><label for="record_shape">Record shape (own records)</label><input type="text" id="record_shape" '
        f'name="record_shape" value="{e(v["record_shape"])}" placeholder="e.g. 3,32,32"></div>'
        + num("num_classes", "Classes", 'min="2"')
        + num("n_models", "Number of models n", 'min="4" step="2"')
        + num("batch_threshold", "Batch size m (records that start a round)", 'min="2"')
        + num("shadow_models", "Shadow models k (preparation)", 'min="2"')
        + num("models_per_job", "Models per worker job", 'min="1"') + "</div>"
        '<div class="fields"><div class="span2"><label for="method">Headline method</label>'
        f'<select id="method" name="method">{methods}</select></div>'
        + num("alpha", "α (offline methods)", 'step="any" min="0" max="1"')
        + num("seed", "Seed", 'min="0"')
        + num("dp_delta", "δ of each record's empirical ε", 'step="any" min="0" max="0.01"') + "</div>"
        '<div class="fields">' + num("builder_mix", "Builder records mixed into each model", 'min="0"')
        + f'<div class="span2"><label>&nbsp;</label><label class="check"><input type="checkbox" name="fixed_variance" '
          f'value="1"{checked}> pooled (fixed) variance, for small n</label></div></div>'
        '<p class="note">n = 64 or more gives stable record-level scores; n = 16 or fewer gives wide intervals. '
        "The fine-tuning hyperparameters are set with the strategy upload, on the task's page.</p>"
        '<button type="submit">Create task</button></form>')


def task_header(t: registry_pb2.Task, crumb: str = "") -> str:
    return (f'<p class="sub"><a href="/tasks">Tasks</a> › {e(t.name or t.task_id)}{crumb}</p>'
            f'<h1>{e(t.name or t.task_id)} <span class="mono">{e(t.task_id)}</span></h1>'
            f'<p class="sub">{settings_line(t)}</p>')


# -- contributor --------------------------------------------------------------------------------

def sample_gallery(session: Session, t: registry_pb2.Task, dataset: str, page: int) -> str:
    idx = assets.sample_page(dataset, page)
    pages = assets.sample_pages(dataset)
    _, y = assets.contributor_pool(dataset)
    cells = "".join(
        f'<label title="sample {i}, label {int(y[i])}"><img src="/samples/{u(dataset)}/{i}.png" alt="sample {i}" '
        f'width="56" height="56"><input type="checkbox" name="pick" value="{i}"> {int(y[i])}</label>' for i in idx)
    here = f"/tasks/{u(t.task_id)}"
    nav = (f'<a href="{here}?page={(page - 1) % pages}">‹ previous</a> · page {page % pages + 1} of {pages} · '
           f'<a href="{here}?page={(page + 1) % pages}">next ›</a>')
    return (
        f'<form method="post" action="{here}/submit" class="panel">{csrf_field(session)}'
        '<input type="hidden" name="source" value="sample">' + once_field() +
        f"<h3>Pick records from the task's sample set</h3><p class=\"note\">The public contributor split of the "
        f"{e(dataset)} data set (the records <code>ftps-stack demo</code> submits from). Tick the images to "
        f"submit (the number under each is its label), and/or add random ones. {nav}</p>"
        f'<div class="gallery">{cells}</div>'
        '<label for="random_n">…and/or this many random records from the sample set</label>'
        '<div class="fields f3"><div><input type="number" id="random_n" name="random_n" min="1" placeholder="0">'
        "</div></div>"
        '<button type="submit">Submit the picked records</button></form>')


def npz_form(session: Session, t: registry_pb2.Task) -> str:
    shape = ",".join(str(d) for d in t.settings.record_shape)
    return (
        f'<form method="post" action="/tasks/{u(t.task_id)}/submit" enctype="multipart/form-data" '
        f'class="panel js-upload">{csrf_field(session)}<input type="hidden" name="source" value="npz">' + once_field() +
        "<h3>Upload your records</h3>"
        f'<p class="note">An <code>.npz</code> with arrays <code>x</code> [N, {e(shape)}] (float, images in [0, 1]) '
        f"and <code>y</code> [N] (integer labels 0–{t.settings.num_classes - 1}).</p>"
        '<label for="records">Records file</label><input type="file" id="records" name="records" accept=".npz" required>'
        + upload_progress() + '<button type="submit">Submit records</button></form>')


def web_record_card(tid: str, s: common_pb2.RecordScore, has_thumb: bool, *, open_diag: bool = True,
                    rank: int = 0, contributor: bool = False) -> str:
    """The shared record card with this server's figure URLs; a closed diagnosis loads lazily."""
    base = f"/tasks/{u(tid)}/records/{u(s.record_id)}"
    return record_card(s, thumb_src=f"{base}/thumb.png" if has_thumb else None,
                       diag_src=f"{base}/diagnosis.png?round={u(s.round_id)}", diag_width=500,
                       diag_collapsed=not open_diag, rank=rank, show_contributor=contributor)


def ended_round_rows(scores: Sequence[common_pb2.RecordScore], followed: Sequence[RoundView]) -> str:
    """Rows for the rounds that scored these records and that this session did not follow live
    (started elsewhere, or ended before the page looked): shown as done, like a followed one."""
    seen = {r.round_id for r in followed}
    counts: dict[str, int] = {}
    for x in scores:
        if x.round_id not in seen:
            counts[x.round_id] = counts.get(x.round_id, 0) + 1
    return "".join(live_row({"key": f"round-{r}", "state": "done", "text": f"round {r}: done — {n} records",
                             "count": ""}) for r, n in sorted(counts.items()))


RESULTS_PER_PAGE = 20  # record cards per page of a contributor's results (each card is ~300 px tall)


def results_pager(tid: str, *, gallery_page: int, page: int, pages: int, first: int, last: int, total: int) -> str:
    """'records 21-40 of 50' with links to the previous and next page of results (the sample
    gallery's page kept)."""
    def link(k: int, text: str) -> str:
        return f'<a href="/tasks/{u(tid)}?page={gallery_page}&amp;results={k}#results">{text}</a>'

    prev = link(page - 1, "‹ higher scores") if page > 0 else '<span class="note">‹ higher scores</span>'
    nxt = link(page + 1, "lower scores ›") if page + 1 < pages else '<span class="note">lower scores ›</span>'
    return (f'<p class="pager">{prev} · records {first}–{last} of {total}, highest score first '
            f'(page {page + 1} of {pages}) · {nxt}</p>')


def contributor_task_page(session: Session, t: registry_pb2.Task, scores: Sequence[common_pb2.RecordScore],
                          *, dataset: str | None, page: int, subs: Sequence[SubmissionView],
                          rounds: Sequence[RoundView], scores_error: str = "", results_page: int = 0) -> str:
    tid = t.task_id
    submit = sample_gallery(session, t, dataset, page) if dataset else (
        '<div class="panel"><h3>Sample set</h3><p class="note">This task\'s records are not one of the demo '
        "data sets, so there is no public sample set to pick from: upload your own records.</p></div>")
    body = task_header(t) + "<h2>Requested instances</h2>" + f'<div class="grid2"><div>{submit}</div><div>{npz_form(session, t)}'
    body += ('<div class="panel"><h3>Image files</h3><p class="note">To submit image files, put them in an '
             ".npz (<code>ftps-contributor submit</code> also reads a folder of images with a labels.csv).</p></div>"
             "</div></div>")
    # Submissions made from this session, with their live status.
    live = []
    for v in subs:
        s = v.submission
        state = submission_state(s.state)
        live.append(f'<tr data-live="sub-{e(s.submission_id)}" data-state="{e(state)}">'
                    f'<td class="mono">{e(s.submission_id)}</td><td>{e(v.origin)}</td>'
                    f'<td class="num">{len(s.record_ids)}</td>'
                    f'<td><span class="state {e(state)}">{e(state.replace("_", " "))}</span></td>'
                    f'<td class="mono label">{e(s.round_id or "—")}</td></tr>')
        if s.failure_reason:  # why it was not scored, in the contributor's own view
            live.append(f'<tr><td colspan="5" class="note">{e(s.failure_reason)}</td></tr>')
    rows = "".join(live_row(r.item()) for r in rounds) + ended_round_rows(scores, rounds)
    body += '<h2>Your submissions and rounds</h2><div id="live">'
    if subs:
        body += ('<table><tr><th>submission</th><th>from</th><th class="num">records</th><th>state</th>'
                 '<th>round</th></tr>' + "".join(live) + "</table>")
        body += ('<p class="note">A round starts when the task has m records pending (from every contributor), '
                 "or when the builder starts one.</p>")
    else:
        body += '<p class="note">No submissions from this session yet.</p>'
    body += (f'<div class="panel">{rows}</div>' if rows else "") + "</div>"

    body += '<h2 id="results">Evaluation result</h2>'
    if scores_error:
        body += flash_html("error", scores_error)
    elif not scores and subs:
        body += ('<div class="panel"><p>No scores yet: your records are waiting for a round. This page updates '
                 "by itself while a round runs.</p></div>")
    elif not scores:
        body += ('<div class="panel"><p>No scores yet: submit records above. A round scores them once the task '
                 "has enough records (or when the builder starts one); this page then updates by itself.</p></div>")
    else:
        own = {rid for v in subs for rid in v.record_ids}
        ordered = sorted(scores, key=rank_key)
        # A page of cards at a time: 50 records on one page was over 15,000 pixels tall.
        pages = -(-len(ordered) // RESULTS_PER_PAGE)
        results_page = min(max(results_page, 0), pages - 1)
        start = results_page * RESULTS_PER_PAGE
        shown = ordered[start:start + RESULTS_PER_PAGE]
        pager = results_pager(tid, gallery_page=page, page=results_page, pages=pages, first=start + 1,
                              last=start + len(shown), total=len(ordered)) if pages > 1 else ""
        body += (summary_sentence(scores, "your") + stat_cards(scores) + how_to_read(scores, builder=False, collapsed=True)
                 + f'<p><a class="button secondary" href="/tasks/{u(tid)}/scores.csv">Download the scores (CSV)</a> '
                   f'<a class="button secondary" href="/tasks/{u(tid)}/report.zip">Download the report (HTML + plots, zip)</a>'
                 + (f' <a class="button secondary" href="/tasks/{u(tid)}/my-records.npz">Download your submitted records '
                    "with their ids (.npz)</a>" if own else "") + "</p>"
                 + pager + "".join(web_record_card(tid, s, s.record_id in own, open_diag=k < 20)
                                   for k, s in enumerate(shown)) + pager)
        if not own:
            body += ('<p class="note">No images: records submitted in another session are not kept on this '
                     "server; the scores are.</p>")
    return layout(f"{t.name} — contributor", body, session, events=f"/tasks/{u(tid)}/events")


# -- builder ------------------------------------------------------------------------------------

def _blob(ref: common_pb2.BlobRef) -> str:
    if not ref.version:
        return '<span class="state">not uploaded</span>'
    size = f"{ref.size / 1e6:.1f} MB" if ref.size >= 1e6 else f"{ref.size / 1e3:.1f} kB"
    return f'<span class="state done">v{ref.version}</span> {size}, sha256 <span class="mono">{e(ref.sha256[:12])}…</span>'


def builder_assets(session: Session, t: registry_pb2.Task, dataset: str | None) -> str:
    tid = u(t.task_id)
    demo = f"the {e(dataset)} demo" if dataset else ""
    no_demo = ("" if dataset else '<p class="note">No demo assets: the task\'s record shape is not a demo data '
               "set's.</p>")
    default = assets.DEFAULT_STRATEGY.get(dataset or "", "")
    options = "".join(f'<option value="{e(n)}"{" selected" if n == default else ""}>{e(n)}</option>'
                      for n in assets.shipped_strategies())
    recipes = []
    for name in assets.shipped_strategies():
        r = assets.shipped_recipe(name)
        recipes.append(f"<code>{e(name)}</code>: " + ", ".join(f"{k} {e(r.get(k, '?'))}" for k in assets.EDITABLE))
    base = (
        f'<div class="asset"><h3>Base model M0 {_blob(t.base_model)}</h3>'
        f'<form method="post" action="/tasks/{tid}/upload" enctype="multipart/form-data" class="js-upload">'
        f'{csrf_field(session)}<input type="hidden" name="kind" value="base-model">'
        '<label for="base-file">Weights (.safetensors)</label><input type="file" id="base-file" name="file" '
        f'accept=".safetensors">{upload_progress()}<button type="submit">Upload base model</button>'
        + (' <button type="submit" class="secondary" name="demo" value="1" formnovalidate>Use the demo base model '
           f"(pretrained on {demo} builder split, cached)</button>" if dataset else "") + "</form>" + no_demo + "</div>")
    strategy = (
        f'<div class="asset"><h3>Fine-tuning strategy S {_blob(t.strategy)}</h3>'
        f'<form method="post" action="/tasks/{tid}/strategy" enctype="multipart/form-data" class="js-upload">'
        f'{csrf_field(session)}<div class="fields f3"><div><label for="strategy">Shipped strategy</label>'
        f'<select id="strategy" name="strategy">{options}</select></div>'
        '<div class="span2"><label for="strategy-file">…or your own script (.py)</label>'
        '<input type="file" id="strategy-file" name="file" accept=".py"></div></div>'
        '<p class="note">Customise the model hyperparameters: the script\'s <code>RECIPE</code> dict is rewritten '
        "(blank keeps the script's value). Shipped values — " + "; ".join(recipes) + ".</p>"
        '<div class="fields f3"><div><label for="lr">learning rate (lr)</label><input type="text" id="lr" name="lr" '
        'placeholder="keep"></div><div><label for="epochs">epochs</label><input type="number" id="epochs" '
        'name="epochs" min="1" placeholder="keep"></div><div><label for="batch_size">batch size</label>'
        '<input type="number" id="batch_size" name="batch_size" min="1" placeholder="keep"></div></div>'
        f'{upload_progress()}<button type="submit">Upload strategy</button></form></div>')
    data = (
        f'<div class="asset"><h3>Builder data (training distribution) {_blob(t.builder_data)}</h3>'
        f'<form method="post" action="/tasks/{tid}/upload" enctype="multipart/form-data" class="js-upload">'
        f'{csrf_field(session)}<input type="hidden" name="kind" value="data">'
        '<label for="data-file">Records (.npz with x, y)</label><input type="file" id="data-file" name="file" '
        f'accept=".npz">{upload_progress()}<button type="submit">Upload builder data</button>'
        + (' <button type="submit" class="secondary" name="demo" value="1" formnovalidate>Use the demo builder split '
           f"({e(dataset)}, up to {assets.BUILDER_DATA_MAX} records)</button>" if dataset else "") + "</form></div>")
    return model_check_note(t) + base + strategy + data


def model_check_note(t: registry_pb2.Task) -> str:
    """Whether the current base model was checked against the current strategy (in a worker's sandbox)."""
    c = t.model_check
    if not (t.base_model.key and t.strategy.key):
        return ""
    if c.base_model_sha256 == t.base_model.sha256 and c.strategy_sha256 == t.strategy.sha256:
        return (f'<p class="note model-check ok">✓ Base model v{t.base_model.version} fits strategy v{t.strategy.version}: '
                f"checked in a worker's sandbox ({c.num_classes} classes, {c.parameters:,} parameters, "
                f"{c.seconds:.1f} s on {e(c.device)}).</p>")
    return (f'<p class="note model-check">Base model v{t.base_model.version} and strategy v{t.strategy.version} '
            "have not been checked together (uploaded with the check deferred, or the registry has no worker to "
            "check with): upload one of them again.</p>")


def builder_task_page(session: Session, t: registry_pb2.Task, *, dataset: str | None,
                      offline: common_pb2.OfflineGaussian | None, offline_note: str,
                      jobs: Sequence[Job], rounds: Sequence[RoundView], scored: gateway_pb2.GetScoresResponse | None,
                      scores_error: str = "", estimate: str = "") -> str:
    tid = u(t.task_id)
    ok = "step ok"
    body = task_header(t)
    body += (f'<div id="live" class="panel jobs"><h3>Activity</h3>{job_rows(jobs)}</div>' if jobs
             else '<div id="live"></div>')
    body += (f'<h2><span class="{ok if t.ready else "step"}">1</span>Base model, strategy and data</h2>'
             f'<div class="panel">{builder_assets(session, t, dataset)}</div>')
    # Preparation stage.
    body += f'<h2><span class="{ok if offline else "step"}">2</span>Preparation stage: the offline Gaussian</h2><div class="panel">'
    if offline is not None:
        body += (f'<div class="grid2"><div><dl class="kv"><dt>mu</dt><dd>{offline.mu:.4f}</dd><dt>sigma</dt>'
                 f"<dd>{offline.sigma:.4f}</dd><dt>k (shadow models)</dt><dd>{offline.k}</dd><dt>statistics</dt>"
                 f"<dd>{offline.n_values}</dd><dt>fitted</dt><dd>{e(iso(offline.fitted_at))}</dd><dt>base model</dt>"
                 f'<dd class="mono">{e(offline.base_model_sha256[:16])}…</dd></dl>'
                 '<p class="note">phi of held-out builder records under k shadow fine-tunes of M0: the paper\'s '
                 "offline LiRA compares a record's phi with this Gaussian. It is reused by every round of the task "
                 "until the base model changes.</p></div>"
                 f'<div><img src="/tasks/{tid}/offline.png?v={e(iso(offline.fitted_at))}" width="500" height="260" '
                 'alt="the offline Gaussian"></div></div>')
    else:
        body += f'<p class="note">{e(offline_note)}</p>'
    body += (f'<form method="post" action="/tasks/{tid}/prepare">{csrf_field(session)}'
             f'<button type="submit"{"" if t.ready else " disabled"}>'
             f'{"Refit" if offline else "Run the preparation stage"} ({t.settings.shadow_models} shadow fine-tunes)'
             "</button>" + ('<input type="hidden" name="refit" value="1">' if offline else "")
             + ("" if t.ready else ' <span class="note">upload the three assets first</span>') + "</form></div>")
    # Rounds.
    body += f'<h2><span class="{ok if scored and scored.scores else "step"}">3</span>Rounds</h2><div class="panel">'
    body += "".join(live_row(r.item()) for r in rounds)
    if scored is not None:
        body += ended_round_rows(scored.scores, rounds)
    body += (f'<form method="post" action="/tasks/{tid}/rounds" class="inline">{csrf_field(session)}'
             '<input type="hidden" name="force" value="1"><button type="submit">Start a round now with the pending '
             'records</button></form> '
             f'<form method="post" action="/tasks/{tid}/rounds" class="inline">{csrf_field(session)}'
             f'<button type="submit" class="secondary">Start only if m = {t.settings.batch_threshold} are pending'
             "</button></form>"
             '<p class="note">Contributors\' records also start a round by themselves when m are pending. The '
             "progress of rounds started here streams live.</p>"
             + (f'<p class="note estimate">{e(estimate)}</p>' if estimate else "") + "</div>")
    # Batch results summary.
    body += '<h2><span class="step">4</span>Batch view</h2>'
    if scores_error:
        body += flash_html("error", scores_error)
    elif scored is None or not scored.scores:
        body += '<div class="panel"><p>No scored records yet: no round of this task has finished.</p></div>'
    else:
        rids = sorted({s.round_id for s in scored.scores})
        body += ('<div class="panel">' + summary_sentence(list(scored.scores), "the")
                 + "<table><tr><th>round</th><th class=\"num\">records</th><th class=\"num\">models</th>"
                   "<th>method</th><th class=\"num\">AUC</th><th class=\"num\">TPR @ 1% FPR</th></tr>"
                 + "".join(f'<tr><td class="mono">{e(r)}</td><td class="num">{b.n_records}</td>'
                           f'<td class="num">{b.n_models}</td><td>{e(method_name(b.method))}</td>'
                           f'<td class="num">{b.auc:.3f}</td><td class="num">{b.tpr_at_1pct_fpr:.3f}</td></tr>'
                           for r, b in zip(rids, scored.batches, strict=False))
                 + f'</table><p><a class="button" href="/tasks/{tid}/batch">Open the batch view</a></p></div>')
    return layout(f"{t.name} — builder", body, session, events=f"/tasks/{tid}/events")


def batch_page(session: Session, t: registry_pb2.Task, scored: gateway_pb2.GetScoresResponse,
               rounds: dict[str, common_pb2.RoundResult], *, round_filter: str = "") -> str:
    tid = u(t.task_id)
    scores = [s for s in scored.scores if not round_filter or s.round_id == round_filter]
    body = task_header(t, " › batch view")
    if not scores:
        body += ('<div class="panel"><p>No scores that this token may see: either no round of this task has '
                 "finished, or its records are not yours to see.</p></div>")
        return layout(f"{t.name} — batch view", body, session)
    ranked = sorted(scores, key=rank_key)
    contributors = sorted({s.contributor for s in scores})
    aucs = [r.batch.auc for r in rounds.values() if r.HasField("batch") and r.batch.n_models]
    q = f"?round={u(round_filter)}" if round_filter else ""
    body += (summary_sentence(scores, "the")
             + stat_cards(scores, [card(str(len(contributors)), "contributors"), card(str(len(rounds)), "rounds")]
                          + ([card(f"{np.mean(aucs):.2f}", "batch AUC (headline)")] if aucs else []))
             + how_to_read(scores, builder=True, collapsed=True)
             + f'<p><a class="button secondary" href="/tasks/{tid}/scores.csv{q}">Download every score (CSV)</a> '
               f'<a class="button secondary" href="/tasks/{tid}/report.zip{q}">Download the batch report (HTML + plots, zip)</a></p>'
             + f'<h2>Scores of the batch</h2><figure><img src="/tasks/{tid}/batch/scores.png{q}" width="1100" '
               'height="440" alt="histogram of the scores and every record\'s interval"><figcaption>Left: histogram of '
               "the records' headline (model-based) scores. Right: every record's score with its 95% interval, "
               "sorted; red where the whole interval is above 0.</figcaption></figure>")
    body += "<h2>Attack strength, every method</h2>"
    for rid in sorted(rounds):
        r = rounds[rid]
        metrics = list(r.method_metrics) or ([r.batch] if r.HasField("batch") else [])
        notes = []
        if r.HasField("offline") and r.offline.k:
            notes.append(f"Offline Gaussian: mu = {r.offline.mu:.3f}, sigma = {r.offline.sigma:.3f} from "
                         f"k = {r.offline.k} shadow models.")
        if r.timings:
            notes.append("Timings: " + ", ".join(f"{e(k.removesuffix('_s').replace('_', ' '))} {v:.1f} s"
                                                 for k, v in sorted(r.timings.items())) + ".")
        body += (f'<h3>Round <span class="mono">{e(rid)}</span> — {r.batch.n_records or r.status.n_records} records, '
                 f'{r.batch.n_models} models</h3><div class="grid2"><figure><img src="/tasks/{tid}/rounds/{u(rid)}/roc.png" '
                 f'width="550" height="500" alt="log-log ROC of every method, round {e(rid)}"></figure><div>'
                 + method_table(metrics, r.batch.method) + '<p class="note">★ the headline method; every method scores the same fine-tuned models.</p>'
                 + "".join(f'<p class="note">{n}</p>' for n in notes) + "</div></div>")
    body += "<h2>Contributors</h2>" + contributors_table(scores)
    have = session.local_records
    top = ranked[:TOP_RISK]
    cards = "".join(web_record_card(t.task_id, s, s.record_id in have, rank=k + 1, contributor=True)
                    for k, s in enumerate(top))
    body += f"<h2>Highest-risk records (top {len(top)} by score)</h2>{cards}"
    body += (f'<form method="post" action="/tasks/{tid}/local-records" enctype="multipart/form-data" '
             f'class="panel js-upload">{csrf_field(session)}<h3>Thumbnails from your own copy of the records</h3>'
             '<p class="note">The service never gives a builder raw records. To see images next to the scores, '
             "choose a local .npz holding the records with a <code>record_id</code> array (e.g. the file a "
             "contributor downloads from their page). It stays on this web server, in your session; it is not "
             f"sent to the services. {len(have)} record image(s) loaded.</p>"
             '<input type="file" name="records" accept=".npz" required>' + upload_progress()
             + '<button type="submit">Load images</button></form>')
    body += (f"<h2>All records ({len(scores)})</h2><details><summary>every record, highest score first</summary>"
             + records_table(ranked, readings=False) + "</details>")
    return layout(f"{t.name} — batch view", body, session)
