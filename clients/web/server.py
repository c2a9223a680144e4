"""The interactive web client (the paper's live system, Figure 3): a small HTTP server that serves
the contributor's and the builder's pages and talks to the services over gRPC with the signed-in
user's own token, through the same client library as the command-line tools.

It has no API of its own and decides nothing about who may see what: every page and figure is
built from calls made with the user's token, so it shows exactly what that token may see, and a
refusal is shown as the service's status and message.

Security of the pages themselves: the token stays on the server, in a session whose id alone
travels in Starlette's signed session cookie (HttpOnly, SameSite=Strict); every POST carries the
session's CSRF token in a hidden field and is refused from another origin (checked here: the
maintained CSRF middlewares for Starlette are double-submit-cookie designs, while this token belongs
to the server-side session and must be read from multipart uploads too); a strict
Content-Security-Policy (no inline script or style); pages are Jinja2 templates with autoescaping
(:mod:`clients.web.pages`); errors are shown as messages, never stack traces (those go to the log
with an incident id).

A Starlette app served by uvicorn in a background thread (the handlers are plain functions run in
its thread pool: they make blocking gRPC calls); run it next to the services:

    WebServer(stack.addresses).start()   # -> "http://127.0.0.1:8080"
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import grpc
import numpy as np
import uvicorn
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette import convertors
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.responses import StreamingResponse
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients import score_html
from clients.api import KIND_NAMES, estimate_text
from clients.score_html import headline, raw_row
from clients.web import assets, pages
from clients.web.session import Session, SubmissionView, error_text, token_claims
from ftps.common import archives, grpcutil, serde
from ftps.common.clock import iso
from ftps.common.errors import FtpsError
from ftps.records import files, tables, tabular
from ftps.records.npz import Records
from ftps.v1 import common_pb2, registry_pb2, scorer_pb2

__all__ = ["WebServer"]

log = logging.getLogger("ftps.web")

COOKIE = "ftps_session"
MAX_BODY = 256 * 1024 * 1024  # the largest upload accepted (builder data of a demo is ~13 MB)
SSE_MAX_S = 300.0             # an event stream ends after this; the browser reconnects by itself
ANON_TTL_S = 3600.0
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it, browsers send "Origin: null" on form posts, and the origin check needs it.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
# Matplotlib's text layout (mathtext on log axes) is not thread-safe: one figure at a time.
_PLOT_LOCK = threading.Lock()


def plotting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with _PLOT_LOCK:
        return fn(*args, **kwargs)


# -- requests and responses ---------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    session: Session | None = None
    form: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str, default: str = "") -> str:
        return (self.query.get(name) or [default])[0]

    def field(self, name: str, default: str = "") -> str:
        return (self.form.get(name) or [default])[0]

    def file(self, name: str) -> tuple[str, bytes] | None:
        f = self.files.get(name)
        return f if f and (f[0] or f[1]) else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Callable[[], AsyncIterator[bytes]] | None = None  # an event stream, sent after the headers
    sid: str | None = None  # the session the browser holds from now on (sign-in, sign-out, a fresh visitor)


class Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class Refused(Exception):
    """The request itself is refused (CSRF, origin, size, not signed in): an HTTP status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UserError(Exception):
    """A problem with what the user entered; shown as is."""


def html(text: str, status: int = 200) -> Response:
    return Response(status, text.encode())


def png(data: bytes) -> Response:
    return Response(200, data, "image/png", {"Cache-Control": "private, max-age=60"})


def attachment(data: bytes, filename: str, content_type: str) -> Response:
    return Response(200, data, content_type, {"Content-Disposition": f'attachment; filename="{filename}"'})


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, list[str]], dict[str, tuple[str, bytes]]]:
    """multipart/form-data -> (fields, files: name -> (filename, bytes)), by python-multipart (the
    parser Starlette uses) over the whole body: uploads are bounded by MAX_BODY and handed to the
    services as bytes anyway."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Refused(400, "multipart form without a boundary")
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, bytes]] = {}
    part: dict[str, Any] = {}
    header = [b"", b""]

    def on_part_begin() -> None:
        part.clear()
        part.update(disposition=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition":
            part["disposition"] = header[1]
        header[0] = header[1] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"] += data[start:end]

    def on_part_end() -> None:
        _, options = parse_options_header(part["disposition"])
        name = options.get(b"name")
        if name is None:
            return
        key = name.decode("utf-8", "replace")
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
            files[key] = (Path(filename.replace("\\", "/")).name, bytes(part["data"]))
        else:
            fields.setdefault(key, []).append(part["data"].decode("utf-8", "replace"))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # noqa: BLE001 - python-multipart's errors: a malformed body
        raise Refused(400, f"malformed multipart form ({exc})") from None
    return fields, files


# -- the server ---------------------------------------------------------------------------------

class WebServer:
    """The web client. ``addresses``: the services' ``host:port`` by name (``gateway``,
    ``registry``, ``scorer``; an ``EmbeddedStack``'s ``addresses`` will do); ``tls_ca``: a CA
    file (PEM) to reach services that serve TLS."""

    def __init__(self, addresses: dict[str, str], *, host: str = "127.0.0.1", port: int = 8080,
                 tls_ca: str | Path | None = None) -> None:
        missing = [k for k in ("gateway", "registry", "scorer") if not addresses.get(k)]
        if missing:
            raise ValueError(f"the web client needs the addresses of {', '.join(missing)}")
        self.addresses = {k: addresses[k] for k in ("gateway", "registry", "scorer")}
        self.tls = grpcutil.Tls.from_files(ca_file=str(tls_ca)) if tls_ca else None
        self.host, self.port = host, port
        self.url = ""
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._uvicorn: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        # Signs the session cookie (which carries only the session id); sessions live in this process.
        self.cookie_key = secrets.token_urlsafe(32)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> str:
        """Listen (port 0 picks a free one) and serve in a background thread -> the base URL."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            # Bound here rather than by uvicorn: the real port is known at once and a busy one fails start().
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"web client: cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                          "pick another port") from exc
        self.port = sock.getsockname()[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        # log_config=None: the embedding program (ftps-stack, the tests) owns the logging setup.
        config = uvicorn.Config(build_app(self), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name="ftps-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"web client: the server on {self.url} did not start")
            time.sleep(0.02)
        self._sock = sock
        log.info("web client on %s", self.url)
        return self.url

    def stop(self) -> None:
        self._stopping.set()  # ends the event streams, so the graceful shutdown does not wait on them
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=15)
            self._uvicorn = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- sessions ------------------------------------------------------------------------------
    def _new_session(self) -> Session:
        s = Session(secrets.token_urlsafe(32))
        with self._lock:
            self._sessions[s.sid] = s
        return s

    def _drop_session(self, s: Session) -> None:
        with self._lock:
            self._sessions.pop(s.sid, None)
        s.close()

    def _find_session(self, sid: str | None) -> Session | None:
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._sessions.values()
                     if (s.signed_in and s.expired()) or (not s.signed_in and now - s.last_seen > ANON_TTL_S)]
            for s in stale:
                self._sessions.pop(s.sid, None)
            found = self._sessions.get(sid) if sid else None
        for s in stale:
            s.close()
        if found is not None:
            found.last_seen = now
        return found

    # -- routing -------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, str, Callable[[Request], Response]]]:
        """(method, Starlette path, handler). ``ftps_id``: ids as the services accept them
        (ftps.common.storage.check_id): nothing else reaches a handler, a redirect target or a header."""
        T = "/tasks/{tid:ftps_id}"
        R = "{rid:ftps_id}"
        return [
            ("GET", "/", self.index), ("GET", "/healthz", self.healthz), ("GET", "/favicon.ico", self.favicon),
            ("GET", "/static/app.css", self.static_css), ("GET", "/static/app.js", self.static_js),
            ("POST", "/signin", self.signin), ("POST", "/signout", self.signout),
            ("GET", "/tasks", self.tasks), ("POST", "/tasks", self.create_task),
            ("GET", T, self.task), ("GET", T + "/events", self.events),
            ("GET", T + "/scores.csv", self.scores_csv), ("GET", T + "/report.zip", self.report_zip),
            ("GET", T + "/my-records.npz", self.my_records),
            ("GET", T + "/records/" + R + "/diagnosis.png", self.diagnosis_png),
            ("GET", T + "/records/" + R + "/thumb.png", self.thumb_png),
            ("GET", T + "/records/" + R + "/unusual.png", self.unusual_png),
            ("GET", T + "/offline.png", self.offline_png),
            ("GET", T + "/batch", self.batch), ("GET", T + "/batch/scores.png", self.batch_scores_png),
            ("GET", T + "/rounds/" + R + "/roc.png", self.roc_png),
            ("GET", T + "/rounds/" + R + "/comparison.png", self.comparison_png),
            ("GET", "/samples/{dataset:ftps_dataset}/{idx:int}.png", self.sample_png),
            ("POST", T + "/submit", self.submit), ("POST", T + "/upload", self.upload),
            ("POST", T + "/strategy", self.upload_strategy), ("POST", T + "/prepare", self.prepare),
            ("POST", T + "/rounds", self.start_round), ("POST", T + "/local-records", self.local_records),
            ("POST", T + "/rounds/" + R + "/grow", self.grow_round),
            ("POST", T + "/rounds/" + R + "/compare", self.compare_recipes),
        ]

    def handle(self, fn: Callable[[Request], Response], req: Request, cookie_sid: str | None) -> Response:
        resp = self._handle(fn, req, cookie_sid)
        if resp.status == 303 and req.headers.get("X-Ftps-Upload") == "1":
            # The page's script sent the form (for upload progress): it follows the redirect itself,
            # so the flash message is kept for the page it loads.
            resp = Response(200, json.dumps({"location": resp.headers["Location"]}).encode(), "application/json",
                            {k: v for k, v in resp.headers.items() if k != "Location"}, sid=resp.sid)
        return resp

    def _handle(self, fn: Callable[[Request], Response], req: Request, cookie_sid: str | None) -> Response:
        req.session = self._find_session(cookie_sid)
        try:
            if req.method == "POST":
                self._check_post(req)
            return fn(req)
        except Redirect as r:
            return Response(303, b"", headers={"Location": r.location})
        except Refused as exc:
            return html(pages.error_page(req.session, "Refused", str(exc)), exc.status)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a readable page
            return self._failure(req, exc)

    def not_found(self, req: Request, cookie_sid: str | None, status: int) -> Response:
        """No route for the path (404) or not for this method (405)."""
        return html(pages.error_page(self._find_session(cookie_sid), "Not found", f"There is no page at {req.path}."),
                    status)

    def _failure(self, req: Request, exc: Exception) -> Response:
        s = req.session
        if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED and s and s.signed_in:
            # The token expired or was revoked: end the session, ask for a new one.
            self._drop_session(s)
            anon = self._new_session()
            anon.flash("error", f"{error_text(exc)} — sign in again with a valid token.")
            if req.method == "GET" and not _is_asset(req.path):
                return Response(303, b"", headers={"Location": "/"}, sid=anon.sid)
            return Response(401, b"signed out: the token was refused", "text/plain; charset=utf-8", sid=anon.sid)
        if isinstance(exc, (grpc.RpcError, FtpsError)):
            message = error_text(exc) if isinstance(exc, grpc.RpcError) else f"{exc.code.name}: {exc}"
            code = exc.code() if isinstance(exc, grpc.RpcError) else exc.code
            status = HTTP_STATUS.get(code, 502)
        elif isinstance(exc, (UserError, assets.AssetError)):
            message, status = str(exc), 400
        else:
            incident = uuid.uuid4().hex[:8]
            log.error("web client: incident %s on %s %s", incident, req.method, req.path, exc_info=exc)
            message = (f"the web server failed to do this (incident {incident}); the details are in its log, "
                       "not on this page.")
            status = 500
        if req.method == "POST" and s is not None:
            s.flash("error", message)
            return Response(303, b"", headers={"Location": _back(req.path)})
        if _is_asset(req.path):
            return Response(status, message.encode(), "text/plain; charset=utf-8")
        title = "Refused" if status in (401, 403) else "Not found" if status == 404 else "Something went wrong"
        return html(pages.error_page(s, title, message), status)

    def _check_post(self, req: Request) -> None:
        """Same-origin POSTs only, with the session's CSRF token."""
        origin = req.headers.get("Origin")
        host = req.headers.get("Host", "")
        if origin is not None and origin != f"http://{host}" and origin != f"https://{host}":
            raise Refused(403, "cross-origin form submission refused")
        if req.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise Refused(403, "cross-site form submission refused")
        if req.session is None:
            raise Refused(403, "no session: reload the page and submit the form again")
        token = req.field("csrf")
        if not token or not hmac.compare_digest(token.encode(), req.session.csrf.encode()):
            raise Refused(403, "the form's CSRF token is missing or stale: reload the page and submit it again")

    def _signed_in(self, req: Request) -> Session:
        s = req.session
        if s is None or not s.signed_in:
            if req.method == "GET" and not _is_asset(req.path):
                raise Redirect("/")
            raise Refused(401, "not signed in")
        return s

    # -- pages: sign in, tasks -------------------------------------------------------------------
    def index(self, req: Request) -> Response:
        s = req.session
        if s is not None and s.signed_in:
            raise Redirect("/tasks")
        fresh = s is None
        s = s or self._new_session()
        r = html(pages.signin_page(s))
        if fresh:
            r.sid = s.sid
        return r

    def healthz(self, req: Request) -> Response:
        return Response(200, b"ok\n", "text/plain; charset=utf-8")

    def favicon(self, req: Request) -> Response:
        return Response(204, b"", "image/x-icon", {"Cache-Control": "max-age=86400"})

    def static_css(self, req: Request) -> Response:
        from clients.web.static import CSS

        return Response(200, CSS.encode(), "text/css; charset=utf-8", {"Cache-Control": "no-cache"})

    def static_js(self, req: Request) -> Response:
        from clients.web.static import JS

        return Response(200, JS.encode(), "text/javascript; charset=utf-8", {"Cache-Control": "no-cache"})

    def signin(self, req: Request) -> Response:
        anon = req.session
        token = req.field("token").strip()
        claims = token_claims(token) if token else None
        if claims is None:
            anon.flash("error", "That is not an FT-PrivacyScore token (ask for one, e.g. "
                                "`ftps-stack token --role contributor --subject NAME`).")
            raise Redirect("/")
        if claims["role"] not in ("contributor", "builder", "admin"):
            anon.flash("error", f"A {claims['role']} token is for the services themselves, not for people.")
            raise Redirect("/")
        s = Session(secrets.token_urlsafe(32))  # a new id at sign-in: no session fixation
        s.sign_in(token, claims, self.addresses, self.tls)
        try:
            s.list_tasks()  # the services check the token; a refusal is shown as is
        except grpc.RpcError as exc:
            s.close()
            anon.flash("error", f"Sign-in refused — {error_text(exc)}")
            raise Redirect("/") from None
        self._drop_session(anon)
        with self._lock:
            self._sessions[s.sid] = s
        log.info("web client: %s %r signed in", s.role, s.subject)
        return Response(303, b"", headers={"Location": "/tasks"}, sid=s.sid)

    def signout(self, req: Request) -> Response:
        self._drop_session(req.session)
        anon = self._new_session()
        anon.flash("info", "Signed out; the token is forgotten by this server.")
        return Response(303, b"", headers={"Location": "/"}, sid=anon.sid)

    def tasks(self, req: Request) -> Response:
        s = self._signed_in(req)
        try:
            tasks, error = s.list_tasks(), ""
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            tasks, error = [], error_text(exc)
        return html(pages.tasks_page(s, sorted(tasks, key=lambda t: iso(t.created_at), reverse=True), error))

    def create_task(self, req: Request) -> Response:
        s = self._signed_in(req)
        # Kept until the task exists: a refused form is shown again as it was filled in.
        s.forms["create"] = {k: req.field(k) for k in pages.CREATE_DEFAULTS}
        dataset = req.field("dataset")
        schema = None
        if dataset == "tabular":
            schema = _schema_upload(req.file("schema"))
            shape = []  # the registry sets it to the schema's encoded width
        elif assets.is_tabular(dataset):
            schema = assets.demo_schema(dataset)  # ftps-stack demo's: the builder's own normalisation
            shape = []
        elif dataset in assets.DATASET_SHAPES:
            shape = list(assets.DATASET_SHAPES[dataset])
        else:
            from clients.cli_common import InputError, parse_shape

            try:
                shape = list(parse_shape(req.field("record_shape"), flag="record shape"))
            except InputError as exc:
                raise UserError(str(exc)) from None
        try:
            settings = common_pb2.TaskSettings(
                n_models=_int(req, "n_models"), batch_threshold=_int(req, "batch_threshold"),
                method=serde.method_enum(req.field("method", "online-per-record")),
                alpha=_float(req, "alpha", 0.05), shadow_models=_int(req, "shadow_models"),
                fixed_variance=req.field("fixed_variance") == "1", record_shape=shape,
                num_classes=_int(req, "num_classes", 10), builder_mix=_int(req, "builder_mix", 0),
                seed=_int(req, "seed", 0), models_per_job=_int(req, "models_per_job", 4),
                dp_delta=_float(req, "dp_delta", 1e-5),
                mask_unit=common_pb2.MASK_UNIT_CONTRIBUTOR if req.field("mask_unit") == "contributor"
                else common_pb2.MASK_UNIT_RECORD)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if schema is None:
            settings.value_range.CopyFrom(common_pb2.ValueRange(min=0.0, max=1.0))  # the shipped strategies' images
        else:
            # A tabular task's ranges are per column, in its schema; named classes say how many there are.
            settings.schema.CopyFrom(schema.to_proto())
            if schema.class_names:
                settings.num_classes = len(schema.class_names)
        task = s.builder().create_task(req.field("name").strip(), settings)
        s.forms.pop("create", None)
        s.flash("info", f"Task {task.task_id} created. Next: upload the base model, the strategy and the data.")
        raise Redirect(f"/tasks/{task.task_id}")

    # -- the task page ---------------------------------------------------------------------------
    def task(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        t = s.builder().get_task(tid)
        dataset = assets.dataset_for_task(t.settings)
        if s.is_contributor:
            if dataset is not None and not _pool_available(dataset):
                dataset = None
            try:
                resp, err = s.contributor().scores_response(tid), ""
                scores, contributions = list(resp.scores), list(resp.contributor_scores)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                scores, contributions, err = [], [], error_text(exc)
            page = int(req.arg("page", "0")) if req.arg("page", "0").isdigit() else 0
            subs = [v for v in s.submissions.values() if v.submission.task_id == tid]
            rounds = [r for r in s.rounds.values() if r.task_id == tid]
            results = req.arg("results", "0")
            return html(pages.contributor_task_page(s, t, scores, dataset=dataset, page=page, subs=subs,
                                                    rounds=rounds, scores_error=err, contributions=contributions,
                                                    results_page=int(results) if results.isdigit() else 0))
        b = s.builder()
        offline, note = None, ""
        try:
            prep = b.get_preparation(tid)
            if prep.state == scorer_pb2.PREPARATION_STATE_READY and prep.HasField("gaussian"):
                offline = prep.gaussian
            elif prep.state == scorer_pb2.PREPARATION_STATE_FAILED:
                note = f"The preparation stage failed: {prep.message}"
            else:
                left = f", about {prep.remaining_s:.0f} s left" if prep.remaining_s > 0 else ""
                note = (f"Preparing: {prep.models_done} of {prep.models_total} shadow models fine-tuned, "
                        f"{prep.elapsed_s:.0f} s elapsed{left}.")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            note = exc.details() if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) \
                else error_text(exc)
        try:
            scored, err = b.scores(tid), ""
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            scored, err = None, error_text(exc)
        try:  # cost before you pay; nothing to say before the preparation has timed the workers
            estimate = "A round now: " + estimate_text(b.estimate_round(tid)) + "."
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise
            estimate = ""
        jobs = [j for j in s.jobs.values() if j.task_id == tid]
        rounds = [r for r in s.rounds.values() if r.task_id == tid]
        return html(pages.builder_task_page(s, t, dataset=dataset, offline=offline,
                                            offline_note=note or "Not prepared yet.", jobs=jobs, rounds=rounds,
                                            scored=scored, scores_error=err, estimate=estimate))

    def events(self, req: Request) -> Response:
        """Server-sent events: this session's jobs, submissions and rounds of the task (the rounds'
        states come from the gRPC WatchRound streams the session follows)."""
        s = self._signed_in(req)
        tid = req.params["tid"]
        return Response(200, b"", "text/event-stream", stream=lambda: self.stream_events(s, tid))

    async def stream_events(self, s: Session, tid: str) -> AsyncIterator[bytes]:
        # Polled rather than woken by the session's condition: a wait would hold a worker thread per open page.
        yield b"retry: 2000\n\n"
        last, ping = "", time.monotonic()
        deadline = time.monotonic() + SSE_MAX_S
        while not self._stopping.is_set() and not s.closed and time.monotonic() < deadline:
            payload = json.dumps({"items": s.live_items(tid)})
            if payload != last:
                yield f"data: {payload}\n\n".encode()
                last, ping = payload, time.monotonic()
            elif time.monotonic() - ping > 15:
                yield b": ping\n\n"
                ping = time.monotonic()
            await asyncio.sleep(0.25)

    # -- contributor actions -------------------------------------------------------------------
    def submit(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        once = req.field("once")
        key = f"web-{once}" if re.fullmatch(r"[0-9a-f]{16}", once) else ""
        if req.field("source") == "sample":
            t = s.builder().get_task(tid)
            dataset = assets.dataset_for_task(t.settings)
            if dataset is None:
                raise UserError("this task has no sample set")
            x, y, idx = assets.pick_samples(dataset, req.form.get("pick", []), req.field("random_n"),
                                            seed=secrets.randbits(32))
            origin = f"sample set ({dataset}): {len(idx)} records"
        else:
            f = req.file("records")
            if f is None:
                raise UserError("choose a file with your records (.npz, or .csv / .parquet for a tabular task)")
            # Checked against the task's settings and schema before anything is sent.
            recs = files.parse(f[1], f[0] or "the file", files.Expect.of(s.builder().get_task(tid).settings))
            x, y = recs.x, recs.y
            origin = f[0] or "uploaded file"
        sub = s.contributor().submit(tid, x, y, idempotency_key=key)
        s.submissions[sub.submission_id] = SubmissionView(sub, x, y, origin)
        s.follow_submission(sub.submission_id)
        s.flash("info", f"{len(sub.record_ids)} records stored (submission {sub.submission_id}); "
                        f"{sub.pending_in_task} records of the task are waiting for a round.")
        raise Redirect(f"/tasks/{tid}")

    def my_records(self, req: Request) -> Response:
        """The records this session submitted, with the service's record ids: the contributor's own
        data, e.g. to hand to the builder's page for thumbnails."""
        s = self._signed_in(req)
        tid = req.params["tid"]
        subs = [v for v in s.submissions.values() if v.submission.task_id == tid]
        if not subs:
            raise Refused(404, "no records were submitted to this task from this session")
        x = np.concatenate([v.x for v in subs])
        y = np.concatenate([v.y for v in subs])
        ids = np.array([r for v in subs for r in v.record_ids])
        return attachment(archives.records_to_npz(x, y, record_id=ids), f"records-{tid}.npz", "application/octet-stream")

    # -- builder actions -----------------------------------------------------------------------
    def upload(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        kind = req.field("kind")
        if kind not in ("base-model", "data"):
            raise UserError(f"unknown upload kind {kind!r}")
        label = "base model" if kind == "base-model" else "builder data"
        if req.field("demo") == "1":
            t = s.builder().get_task(tid)
            dataset = assets.dataset_for_task(t.settings)
            if dataset is None:
                raise UserError("this task's record shape is not a demo data set's: upload your own file")
            b = s.builder()

            def demo(job) -> str:
                if kind == "base-model":
                    def report(done: int, total: int, text: str) -> None:
                        job.text = f"{text} (demo base model, once; cached)"
                        s.progress(job, done, total)

                    data, cached = assets.demo_base_model(dataset, report)
                    origin = "demo base model (" + ("cached" if cached else "pretrained now") + ")"
                elif assets.is_tabular(dataset):
                    x, y = assets.builder_data(dataset)
                    return self._upload_records(s, job, b, tid, Records(x, y), f"demo builder split of {dataset}")
                else:
                    data = archives.records_to_npz(*assets.builder_data(dataset))
                    origin = f"demo builder split of {dataset}"
                return self._upload_blob(s, job, b, tid, kind, data, origin)

            s.start_job(tid, f"preparing the {label} ({dataset} demo)", demo)
        else:
            f = req.file("file")
            if f is None:
                raise UserError(f"choose a file to upload as the {label}")
            name, data = f
            b = s.builder()
            recs = self._builder_records(b.get_task(tid), name, data) if kind == "data" else None
            if recs is not None:
                s.start_job(tid, f"uploading {label}: {name}",
                            lambda job: self._upload_records(s, job, b, tid, recs, name), total=len(recs.x))
            else:
                s.start_job(tid, f"uploading {label}: {name}",
                            lambda job: self._upload_blob(s, job, b, tid, kind, data, name), unit="bytes",
                            total=len(data))
        raise Redirect(f"/tasks/{tid}")

    @staticmethod
    def _builder_records(t: registry_pb2.Task, name: str, data: bytes) -> Records | None:
        """Builder data to send as records (UploadBuilderData), parsed and checked here so that a bad
        file is refused on the page with nothing stored: a table, or any file of a tabular task (raw
        rows, which the registry encodes). None: an image task's .npz, stored as the blob it is."""
        if tabular.of_settings(t.settings) is None and tables.table_format(name) is None:
            return None
        return files.parse(data, name or "the file", files.Expect.of(t.settings))

    def _upload_records(self, s: Session, job, b, tid: str, recs: Records, origin: str) -> str:
        job.text = f"uploading builder data: {origin} ({len(recs.x)} records)"
        s.progress(job, 0, len(recs.x))
        ref = b.upload_builder_records(tid, recs.x, recs.y, progress=lambda done, total: s.progress(job, done, total))
        return (f"builder data v{ref.version} stored ({origin}): {len(recs.x)} records, {pages.size_text(ref.size)}, "
                f"sha256 {ref.sha256[:12]}…")

    def _upload_blob(self, s: Session, job, b, tid: str, kind: str, data: bytes, origin: str) -> str:
        label = {"base-model": "base model", "data": "builder data", "strategy": "strategy"}[kind]
        job.text, job.unit = f"uploading {label}: {origin}", "bytes"
        s.progress(job, 0, len(data))
        ref = b.upload(tid, KIND_NAMES[kind], data, progress=lambda done, total: s.progress(job, done, total))
        size = f"{ref.size / 1e6:.1f} MB" if ref.size >= 1e6 else f"{ref.size / 1e3:.1f} kB"
        return f"{label} v{ref.version} stored ({origin}): {size}, sha256 {ref.sha256[:12]}…"

    def upload_strategy(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        f = req.file("file")
        if f is not None:
            name, raw = f
            source = _utf8(name, raw, "a strategy is a Python source file")
        else:
            name = req.field("strategy")
            source = assets.shipped_source(name)
        overrides = assets.parse_overrides({k: req.field(k) for k in assets.EDITABLE})
        source = assets.rewrite_recipe(source, overrides)
        edits = ", ".join(f"{k}={v}" for k, v in overrides.items())
        origin = name + (f" with {edits}" if edits else "")
        data = source.encode()
        b = s.builder()
        s.start_job(tid, f"uploading strategy: {origin}",
                    lambda job: self._upload_blob(s, job, b, tid, "strategy", data, origin),
                    unit="bytes", total=len(data))
        raise Redirect(f"/tasks/{tid}")

    def prepare(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        t = s.builder().get_task(tid)
        b = s.builder()
        refit = req.field("refit") == "1"

        def work(job) -> str:
            def show(p) -> None:
                left = f", ~{p.remaining_s:.0f} s left" if p.remaining_s > 0 else ""
                job.text = (f"preparation stage {p.preparation_id}: {p.models_done}/{p.models_total} shadow "
                            f"fine-tunes, {p.elapsed_s:.0f} s elapsed{left}")
                s.progress(job, p.models_done, p.models_total)

            prep = b.prepare(tid, refit=refit, progress=show)
            if prep.state != scorer_pb2.PREPARATION_STATE_READY:
                raise ValueError(f"the preparation stage failed: {prep.message}")
            g = prep.gaussian
            return (f"offline Gaussian fitted: mu = {g.mu:.3f}, sigma = {g.sigma:.3f} from k = {g.k} shadow models "
                    f"({g.n_values} statistics" + (f", fitted in {g.timings['total_s']:.1f} s" if "total_s" in g.timings
                                                   else "") + ")")

        s.start_job(tid, f"preparation stage: {t.settings.shadow_models} shadow fine-tunes of the base model", work)
        raise Redirect(f"/tasks/{tid}")

    def start_round(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        status = s.builder().start_round(tid, force=req.field("force") == "1")
        s.follow_round(tid, status)
        s.flash("info", f"Round {status.round_id} started with {status.n_records} records.")
        raise Redirect(f"/tasks/{tid}")

    def local_records(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        f = req.file("records")
        if f is None:
            raise UserError("choose a records file (.npz, or .csv / .parquet for a tabular task)")
        t = s.builder().get_task(tid)
        recs = files.parse(f[1], f[0] or "the file", files.Expect.of(t.settings))
        what = "rows" if t.settings.HasField("schema") else "images"
        if recs.record_ids is None:
            raise UserError(f"{f[0]} has no record_id array or column: {what} are matched to scores by the "
                            "service's record ids")
        for i, rid in enumerate(recs.record_ids):
            s.local_records[rid] = (recs.x[i], int(recs.y[i]))
        s.flash("info", f"{len(recs.record_ids)} record {what} loaded from {f[0]} (kept in this session only).")
        raise Redirect(f"/tasks/{tid}/batch")

    def grow_round(self, req: Request) -> Response:
        """Add models to a DONE round (GrowRound); its progress is followed like a round's."""
        s = self._signed_in(req)
        tid, rid = req.params["tid"], req.params["rid"]
        try:
            add = _int(req, "add_models")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        status = s.builder().grow_round(rid, add)
        s.follow_round(tid, status)
        s.flash("info", f"Round {rid} is growing to {status.models_total} models ({add} more); its scores so far "
                        "stay readable meanwhile.")
        raise Redirect(f"/tasks/{tid}/batch")

    def compare_recipes(self, req: Request) -> Response:
        """Run a DONE round's batch under 1-4 uploaded strategies beside the task's own
        (CompareRecipes); a session job follows the comparison until every recipe has ended."""
        s = self._signed_in(req)
        tid, rid = req.params["tid"], req.params["rid"]
        recipes: dict[str, bytes] = {}
        for k in range(1, pages.MAX_RECIPES + 1):
            name, f = req.field(f"recipe_name_{k}").strip(), req.file(f"recipe_file_{k}")
            if not name and f is None:
                continue
            if f is None:
                raise UserError(f"recipe {k} ({name}): choose its strategy script (.py)")
            name = name or Path(f[0]).stem
            if name in recipes:
                raise UserError(f"two recipes are named {name!r}: each needs its own name")
            _utf8(f[0], f[1], "a strategy is a Python source file")
            recipes[name] = f[1]
        if not recipes:
            raise UserError("choose at least one strategy script (.py) to compare with the task's own")
        b = s.builder()
        comparison = b.compare_recipes(rid, recipes)
        self._follow_comparison(s, tid, comparison)
        s.flash("info", f"Comparing {len(comparison.variants)} recipes on round {rid}: "
                        f"{', '.join(v.name for v in comparison.variants)}.")
        raise Redirect(f"/tasks/{tid}/batch")

    @staticmethod
    def _follow_comparison(s: Session, tid: str, comparison: common_pb2.RecipeComparison) -> None:
        """A job polling GetComparison (it has no stream) until every recipe has ended."""
        rid = comparison.round_id
        b = s.builder()

        def work(job) -> str:
            c = comparison
            while True:
                job.text = (f"comparing recipes on round {rid}: " + ", ".join(
                    f"{v.name} {common_pb2.RoundState.Name(v.status.state).removeprefix('ROUND_STATE_').lower()}"
                    for v in c.variants))
                s.progress(job, sum(v.status.models_done for v in c.variants),
                           sum(v.status.models_total for v in c.variants))
                if score_html.comparison_done(c) or s.closed:
                    break
                time.sleep(1.0)
                c = b.get_comparison(rid)
            failed = [f"{v.name}: {v.status.message}" for v in c.variants if v.status.state == common_pb2.ROUND_STATE_FAILED]
            if failed:
                raise ValueError("recipe(s) failed — " + "; ".join(failed))
            return (f"recipes compared on round {rid}: {len(c.variants)} recipes, {len(c.exposed_everywhere)} "
                    "record(s) above chance under every recipe")

        s.start_job(tid, f"comparing recipes on round {rid}", work)

    # -- batch view and figures ------------------------------------------------------------------
    def _scores(self, s: Session, tid: str, round_id: str = "") -> list[common_pb2.RecordScore]:
        if s.is_contributor:
            return s.contributor().scores(tid, round_id)
        return list(s.builder().scores(tid, round_id).scores)

    def batch(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        b = s.builder()
        t = b.get_task(tid)
        round_filter = req.arg("round")
        scored = b.scores(tid, round_filter)
        rounds = {rid: b.get_round(rid) for rid in sorted({x.round_id for x in scored.scores})}
        comparisons = self._comparisons(b, rounds)
        for rid, c in comparisons.items():
            # One started elsewhere (the CLI, another session) is followed here too, so the page updates.
            key = f"comparing recipes on round {rid}"
            if not score_html.comparison_done(c) and not any(
                    j.task_id == tid and j.state == "running" and (j.text == key or j.text.startswith(key + ":"))
                    for j in s.jobs.values()):
                self._follow_comparison(s, tid, c)
        return html(pages.batch_page(s, t, scored, rounds, round_filter=round_filter, comparisons=comparisons,
                                     jobs=[j for j in s.jobs.values() if j.task_id == tid],
                                     followed=[r for r in s.rounds.values() if r.task_id == tid]))

    @staticmethod
    def _comparisons(b, round_ids) -> dict[str, common_pb2.RecipeComparison]:
        """Each round's recipe comparison; a round without one (NOT_FOUND) is left out."""
        out = {}
        for rid in round_ids:
            try:
                out[rid] = b.get_comparison(rid)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return out

    def diagnosis_png(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid, rid = req.params["tid"], req.params["rid"]
        round_id = req.arg("round")
        found = [x for x in self._scores(s, tid, round_id) if x.record_id == rid]
        if not found:
            raise Refused(404, "no such record among the scores this token may see")
        sc = found[-1]
        key = ("diag", tid, rid, sc.round_id, sc.score, sc.counted_p, sc.mu_in, sc.mu_out)
        if key not in s.cache:
            from clients import report_plots

            alpha = s.builder().get_task(tid).settings.alpha or 0.05
            offline = None
            if pages.method_name(sc.method) == "offline-global" and not s.is_contributor:
                r = s.builder().get_round(sc.round_id)
                if r.HasField("offline") and r.offline.k:
                    offline = (r.offline.mu, r.offline.sigma)
            s.cache[key] = plotting(report_plots.record_diagnosis_png, sc, alpha=alpha, offline=offline,
                                    offline_hidden=s.is_contributor)
        return png(s.cache[key])

    @staticmethod
    def _local_record(s: Session, rid: str) -> np.ndarray | None:
        """The user's own copy of a record: a contributor's submitted in this session, a builder's
        loaded from their file. Never asked from the services."""
        if s.is_contributor:
            for v in s.submissions.values():
                if rid in v.record_ids:
                    return v.x[v.record_ids.index(rid)]
            return None
        return s.local_records[rid][0] if rid in s.local_records else None

    def thumb_png(self, req: Request) -> Response:
        s = self._signed_in(req)
        rec = self._local_record(s, req.params["rid"])
        data = assets.thumbnail(rec) if rec is not None else None
        if data is None:
            raise Refused(404, "no local image of this record")
        return png(data)

    def unusual_png(self, req: Request) -> Response:
        """A tabular record's most unusual columns (z-scores against the builder's data), drawn from
        the user's own copy of the row."""
        s = self._signed_in(req)
        rec = self._local_record(s, req.params["rid"])
        schema = tabular.of_settings(s.builder().get_task(req.params["tid"]).settings) if rec is not None else None
        row = raw_row(schema, rec) if schema is not None else None
        if row is None:
            raise Refused(404, "no local row of this record")
        from clients import report_plots

        data = plotting(report_plots.unusual_png, schema.unusual(row))
        if data is None:
            raise Refused(404, "none of this row's most unusual columns is numeric")
        return png(data)

    def sample_png(self, req: Request) -> Response:
        self._signed_in(req)
        dataset, idx = req.params["dataset"], int(req.params["idx"])
        if dataset not in assets.DEFAULT_STRATEGY or assets.is_tabular(dataset) or not _pool_available(dataset):
            raise Refused(404, "no such sample set of images")
        x, _ = assets.contributor_pool(dataset)
        if idx >= len(x):
            raise Refused(404, "no such sample record")
        return Response(200, assets.thumbnail(x[idx]), "image/png", {"Cache-Control": "private, max-age=3600"})

    def offline_png(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        b = s.builder()
        prep = b.get_preparation(tid)
        if prep.state != scorer_pb2.PREPARATION_STATE_READY or not prep.HasField("gaussian"):
            raise Refused(404, "the task's preparation stage is not READY")
        g = prep.gaussian
        alpha = b.get_task(tid).settings.alpha or 0.05
        return png(plotting(assets.offline_gaussian_png, g.mu, g.sigma, g.k, g.n_values, alpha))

    def batch_scores_png(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        scores = self._scores(s, tid, req.arg("round"))
        if not scores:
            raise Refused(404, "no scores yet")
        from ftps.privacy import plots

        t = s.builder().get_task(tid)
        methods = ", ".join(sorted({pages.method_name(x.method) for x in scores}))
        h = np.array([headline(x) for x in scores]).reshape(-1, 3)
        return png(plotting(plots.scores_with_intervals_png, h[:, 0], h[:, 1], h[:, 2], what="model-based score",
                            title=f"Privacy scores, task {t.name or tid} ({methods})"))

    def roc_png(self, req: Request) -> Response:
        s = self._signed_in(req)
        rid = req.params["rid"]
        r = s.builder().get_round(rid)
        metrics = list(r.method_metrics) or ([r.batch] if r.HasField("batch") else [])
        curves = [(f"{pages.method_name(b.method)}{' (headline)' if b.method == r.batch.method else ''}  "
                   f"AUC={b.auc:.3f}\nTPR@1%FPR={b.tpr_at_1pct_fpr:.3f}  TPR@0.1%FPR={b.tpr_at_0_1pct_fpr:.3f}",
                   b.roc_fpr, b.roc_tpr) for b in metrics if len(b.roc_fpr)]
        if not curves:
            raise Refused(404, "this round has no ROC (not finished?)")
        from ftps.privacy import plots

        return png(plotting(plots.roc_curves_png, curves, title=f"ROC of every method, round {rid} "
                                                      f"(n={r.batch.n_models}, m={r.batch.n_records})"))

    def comparison_png(self, req: Request) -> Response:
        s = self._signed_in(req)
        rid = req.params["rid"]
        c = s.builder().get_comparison(rid)
        from clients import report_plots

        data = plotting(report_plots.comparison_png, score_html.recipe_rows(c),
                        title=f"Recipes on round {rid}: risk against utility")
        if data is None:
            raise Refused(404, "no recipe of this comparison is done yet")
        return png(data)

    # -- downloads -------------------------------------------------------------------------------
    def scores_csv(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        from clients.reports import write_scores_csv

        scores = sorted(self._scores(s, tid, req.arg("round")), key=lambda x: (x.round_id, x.index))
        with tempfile.TemporaryDirectory(prefix="ftps-web-") as d:
            path = write_scores_csv(Path(d) / "scores.csv", scores)
            data = path.read_bytes()
        return attachment(data, f"scores-{tid}.csv", "text/csv; charset=utf-8")

    def report_zip(self, req: Request) -> Response:
        s = self._signed_in(req)
        tid = req.params["tid"]
        from clients import reports

        round_id = req.arg("round")
        b = s.builder()
        t = b.get_task(tid)
        images = reports.RecordImages()
        with tempfile.TemporaryDirectory(prefix="ftps-web-") as d:
            out = Path(d) / "report"
            if s.is_contributor:
                for v in s.submissions.values():
                    if v.submission.task_id == tid:
                        images.add(None, Records(v.x, v.y, record_ids=v.record_ids, source=v.origin))
                resp = s.contributor().scores_response(tid, round_id)
                plotting(reports.contributor_report, out, task_id=tid, contributor=s.subject, task=t, images=images,
                         scores=list(resp.scores), contributions=list(resp.contributor_scores))
            else:
                if s.local_records:
                    ids = list(s.local_records)
                    images.add(None, Records(np.stack([s.local_records[i][0] for i in ids]),
                                             np.array([s.local_records[i][1] for i in ids]), record_ids=ids,
                                             source="local records"))
                scored = b.scores(tid, round_id)
                rounds = {rid: b.get_round(rid) for rid in sorted({x.round_id for x in scored.scores})}
                plotting(reports.builder_report, out, task_id=tid, scores=list(scored.scores), rounds=rounds, task=t,
                         images=images, comparisons=self._comparisons(b, rounds))
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(out.rglob("*")):
                    if p.is_file():
                        z.write(p, f"report-{tid}/{p.relative_to(out)}")
        return attachment(buf.getvalue(), f"report-{tid}.zip", "application/zip")


# -- HTTP plumbing (Starlette) -----------------------------------------------------------------

class _IdConvertor(convertors.StringConvertor):
    regex = "[A-Za-z0-9_.-]{1,64}"


class _DatasetConvertor(convertors.StringConvertor):
    regex = "[a-z-]+"


# Registered process-wide by Starlette: prefixed names, so no other app's convertor is replaced.
convertors.register_url_convertor("ftps_id", _IdConvertor())
convertors.register_url_convertor("ftps_dataset", _DatasetConvertor())


class _LoopbackHost:
    """Bound to loopback: only loopback Host names (no DNS rebinding of a page onto this server).
    Not Starlette's TrustedHostMiddleware: it cuts "[::1]:8080" at the first colon."""

    def __init__(self, app: ASGIApp, *, bound: str) -> None:
        self.app = app
        self.check = bound in _LOOPBACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.check and scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").rsplit(":", 1)[0]
            if host not in _LOOPBACK:
                await HttpResponse("unexpected Host header", 421, media_type="text/plain")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    """SECURITY_HEADERS on every response, unless the handler set its own (e.g. a figure's Cache-Control)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in self.headers if h[0] not in have]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _read_body(request: HttpRequest) -> bytes:
    """The request body, refused past MAX_BODY (before reading when Content-Length says so)."""
    try:
        length = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        raise Refused(400, "bad Content-Length") from None
    too_big = Refused(413, f"the upload is larger than {MAX_BODY // 2**20} MB")
    if length > MAX_BODY:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_big
    return bytes(body)


def _parse_body(req: Request, body: bytes, content_type: str) -> None:
    if content_type.startswith("multipart/form-data"):
        req.form, req.files = parse_multipart(body, content_type)
    else:
        req.form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _to_http(resp: Response, request: HttpRequest) -> HttpResponse:
    if resp.sid is not None:
        request.session["sid"] = resp.sid  # SessionMiddleware sends the new cookie
    if resp.stream is not None:
        return StreamingResponse(resp.stream(), resp.status, media_type=resp.content_type)
    out = HttpResponse(resp.body, resp.status, headers=resp.headers)
    out.headers["Content-Type"] = resp.content_type
    return out


def build_app(web: WebServer) -> Starlette:
    """The ASGI app over ``web``'s handlers: each runs in the thread pool with the request's form
    already read, and its :class:`Response` becomes Starlette's."""

    def endpoint(fn: Callable[[Request], Response]):
        async def serve(request: HttpRequest) -> HttpResponse:
            req = Request(request.method, request.url.path, parse_qs(request.url.query), request.headers,
                          params={k: str(v) for k, v in request.path_params.items()})
            body = b""
            if request.method == "POST":
                try:
                    body = await _read_body(request)
                except Refused as exc:
                    return HttpResponse(str(exc), exc.status, media_type="text/plain",
                                        headers={"Connection": "close"})

            def run() -> Response:
                if request.method == "POST":
                    try:
                        _parse_body(req, body, request.headers.get("Content-Type", ""))
                    except Refused as exc:
                        return Response(exc.status, str(exc).encode(), "text/plain; charset=utf-8")
                return web.handle(fn, req, request.session.get("sid"))

            return _to_http(await run_in_threadpool(run), request)

        return serve

    async def no_route(request: HttpRequest, exc: Exception) -> HttpResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        req = Request(request.method, request.url.path, {}, request.headers)
        return _to_http(await run_in_threadpool(web.not_found, req, request.session.get("sid"), status), request)

    routes = [HttpRoute(path, endpoint(fn), methods=[method], name=f"{method} {path}")
              for method, path, fn in web.routes()]
    return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route}, middleware=[
        Middleware(_LoopbackHost, bound=web.host),
        Middleware(_SecurityHeaders),
        # The cookie carries only the session id (signed); the token and everything else stay in this process.
        Middleware(SessionMiddleware, secret_key=web.cookie_key, session_cookie=COOKIE, max_age=None,
                   same_site="strict"),
    ])


def _is_asset(path: str) -> bool:
    return path.endswith((".png", ".csv", ".zip", ".npz", "/events"))


def _back(path: str) -> str:
    """Where a failed form sends the user back to (with the message)."""
    m = re.match(r"^(/tasks/[^/]+)", path)
    if not m:
        return "/tasks"
    return m.group(1) + ("/batch" if path.endswith(("/local-records", "/grow", "/compare")) else "")


def _int(req: Request, name: str, default: int | None = None) -> int:
    raw = req.field(name).strip()
    if not raw and default is not None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name.replace('_', ' ')} must be a whole number, got {raw!r}") from None


def _float(req: Request, name: str, default: float) -> float:
    raw = req.field(name).strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _utf8(name: str, data: bytes, what: str) -> str:
    """An uploaded text file's text; UserError naming the file and ``what`` it should be."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text: {what}") from None


def _schema_upload(f: tuple[str, bytes] | None) -> tabular.Schema:
    """A tabular task's schema from the create form's JSON file (``ftps-builder schema`` writes one)."""
    if f is None:
        raise UserError("a tabular task needs its schema: choose the schema's JSON file "
                        "(`ftps-builder schema YOUR_TABLE.csv --out schema.json` writes one)")
    name, data = f
    text = _utf8(name, data, "a schema is a JSON document")
    try:
        return tabular.Schema.from_json(text, what=name or "the schema")
    except FtpsError as exc:
        raise UserError(str(exc)) from None


def _pool_available(dataset: str) -> bool:
    try:
        assets.contributor_pool(dataset)
    except (OSError, ValueError):
        return False
    return True
