"""A signed-in user's server-side state: the token (never sent back to the browser), the gRPC
clients that carry it, background jobs (uploads, the preparation stage) and the rounds the user
follows, whose progress the pages stream live.

A session holds only what the user did through these pages (their submissions, the records they
uploaded, for thumbnails); everything else is asked from the services with the user's token.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from clients.api import BuilderClient, ContributorClient, describe_rpc_error
from ftps.common import serde
from ftps.v1 import common_pb2, gateway_pb2

log = logging.getLogger("ftps.web")

IDLE_TIMEOUT_S = 12 * 3600
TERMINAL_ROUND = serde.TERMINAL_ROUND_STATES
KEEP_JOBS = 12


def round_state(state: int) -> str:
    return common_pb2.RoundState.Name(state).removeprefix("ROUND_STATE_").lower()


def submission_state(state: int) -> str:
    return gateway_pb2.SubmissionState.Name(state).removeprefix("SUBMISSION_STATE_").lower()


def token_claims(token: str) -> dict[str, Any] | None:
    """The unverified claims of an FT-PrivacyScore token, to label the session and pick the view.
    The services verify the signature on every call; nothing here relies on these being true."""
    body = token.split(".", 1)[0]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str) or not isinstance(claims.get("role"), str):
        return None
    return claims


def error_text(exc: BaseException) -> str:
    """What the user reads about a failure: the gRPC status name and details, never a traceback."""
    if isinstance(exc, grpc.RpcError):
        return describe_rpc_error(exc)
    return str(exc) or type(exc).__name__


@dataclass
class Job:
    """Something the web server does for the user in the background, with its progress."""

    id: str
    task_id: str
    text: str
    state: str = "running"   # running | done | failed
    done: int = 0
    total: int = 0           # 0: indeterminate
    unit: str = ""           # "bytes" shows kB counts
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0

    def item(self) -> dict[str, Any]:
        if self.total and self.unit == "bytes":
            count = f"{self.done / 1024:.0f} / {self.total / 1024:.0f} kB"
        elif self.total:
            count = f"{self.done} / {self.total}"
        elif self.ended:
            count = f"took {self.ended - self.started:.1f} s"
        else:
            count = f"{time.monotonic() - self.started:.0f} s"
        return {"key": f"job-{self.id}", "state": self.state, "state_label": self.state, "done": self.done,
                "total": self.total, "count": count, "text": self.text}


@dataclass
class RoundView:
    """A round this session follows (its latest status from WatchRound)."""

    round_id: str
    task_id: str
    status: common_pb2.RoundStatus

    def item(self) -> dict[str, Any]:
        s = self.status
        state = round_state(s.state)
        return {"key": f"round-{self.round_id}", "state": state, "state_label": state,
                "done": s.models_done, "total": s.models_total,
                "count": f"{s.models_done} / {s.models_total} models" if s.models_total else "",
                "text": f"round {self.round_id}: {state}" + (f" — {s.message}" if s.message else "")}


@dataclass
class SubmissionView:
    submission: gateway_pb2.Submission
    x: np.ndarray
    y: np.ndarray
    origin: str  # "sample set" / file name

    @property
    def record_ids(self) -> list[str]:
        return list(self.submission.record_ids)


class Session:
    """One browser's state. ``token`` is None before sign-in (the session then only carries the
    sign-in form's CSRF token)."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.csrf = secrets.token_urlsafe(32)
        self.token: str | None = None
        self.subject = ""
        self.role = ""
        self.expires = 0.0
        self.last_seen = time.monotonic()
        self.flashes: list[tuple[str, str]] = []
        self.jobs: dict[str, Job] = {}
        self.rounds: dict[str, RoundView] = {}
        self.submissions: dict[str, SubmissionView] = {}
        self.local_records: dict[str, tuple[np.ndarray, int]] = {}  # builder's own copy: id -> (x, y)
        self.cache: dict[Any, bytes] = {}
        self.forms: dict[str, dict[str, str]] = {}  # a refused form's values, to show it again filled in
        self._builder: BuilderClient | None = None
        self._contributor: ContributorClient | None = None
        self._calls: set[Any] = set()
        self._closed = threading.Event()
        self.changed = threading.Condition()
        self._ids = itertools.count(1)
        self.addresses: dict[str, str] = {}
        self.tls = None

    # -- identity -------------------------------------------------------------------------------
    @property
    def signed_in(self) -> bool:
        return self.token is not None

    @property
    def is_contributor(self) -> bool:
        return self.role == "contributor"

    def sign_in(self, token: str, claims: dict[str, Any], addresses: dict[str, str], tls) -> None:
        self.token = token
        self.subject = str(claims["sub"])
        self.role = str(claims["role"])
        self.expires = float(claims.get("exp") or 0)
        self.addresses = addresses
        self.tls = tls

    def expired(self) -> bool:
        if self.expires and time.time() >= self.expires:
            return True
        return time.monotonic() - self.last_seen > IDLE_TIMEOUT_S

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        out, self.flashes = self.flashes, []
        return out

    # -- clients (the user's own token on every call) -------------------------------------------
    def builder(self) -> BuilderClient:
        if self._builder is None:
            a = self.addresses
            self._builder = BuilderClient(registry=a["registry"], gateway=a["gateway"], scorer=a["scorer"],
                                          token=self.token, tls=self.tls)
        return self._builder

    def contributor(self) -> ContributorClient:
        if self._contributor is None:
            self._contributor = ContributorClient(gateway=self.addresses["gateway"], token=self.token, tls=self.tls)
        return self._contributor

    def list_tasks(self):
        # BuilderClient only bundles the registry stub; the token decides what the call returns.
        return self.builder().list_tasks()

    def close(self) -> None:
        self._closed.set()
        for call in list(self._calls):
            call.cancel()
        for c in (self._builder, self._contributor):
            if c is not None:
                c.close()
        self._builder = self._contributor = None
        self.notify()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # -- background jobs ------------------------------------------------------------------------
    def start_job(self, task_id: str, text: str, work: Callable[[Job], str], *, unit: str = "",
                  total: int = 0) -> Job:
        """Runs ``work(job)`` in a thread; it returns the success message or raises (the error
        becomes the job's message). Progress: set ``job.done`` / ``job.total`` and ``notify()``."""
        job = Job(id=f"{next(self._ids)}", task_id=task_id, text=text, unit=unit, total=total)
        self.jobs[job.id] = job
        for old in [j for j in self.jobs.values() if j.state != "running"][:-KEEP_JOBS]:
            self.jobs.pop(old.id, None)

        def run() -> None:
            try:
                job.message = work(job)
                job.state = "done"
                if job.total:
                    job.done = job.total
            except Exception as exc:
                if self.closed:
                    return
                job.state, job.message = "failed", error_text(exc)
                if not isinstance(exc, (grpc.RpcError, ValueError)):
                    log.warning("web job %r failed", text, exc_info=True)
            finally:
                job.ended = time.monotonic()
                self.notify()

        threading.Thread(target=run, name=f"web-job-{job.id}", daemon=True).start()
        self.notify()
        return job

    def progress(self, job: Job, done: int, total: int | None = None) -> None:
        job.done = done
        if total is not None:
            job.total = total
        self.notify()

    # -- following rounds -----------------------------------------------------------------------
    def follow_round(self, task_id: str, status: common_pb2.RoundStatus) -> None:
        """Stream the round's progress (gRPC WatchRound, with the user's token) into the session."""
        rid = status.round_id
        if rid in self.rounds and self.rounds[rid].status.state not in TERMINAL_ROUND:
            return
        self.rounds[rid] = RoundView(rid, task_id, status)
        threading.Thread(target=self._watch_round, args=(task_id, rid), name=f"web-round-{rid}",
                         daemon=True).start()
        self.notify()

    def _watch_round(self, task_id: str, rid: str) -> None:
        client = self.contributor() if self.is_contributor else self.builder()
        delay = 0.5
        while not self.closed:
            try:
                call = client.watch_round(rid, timeout=3600)
                self._calls.add(call)
                try:
                    for status in call:
                        fresh = self._fetch_submissions(rid) if status.state in TERMINAL_ROUND else {}
                        # One step for the event stream: the round's end and its submissions' new states
                        # (a page reloaded for the end shows everything settled, and reloads once).
                        with self.changed:
                            for sid, sub in fresh.items():
                                self.submissions[sid].submission = sub
                            self.rounds[rid] = RoundView(rid, task_id, status)
                            self.changed.notify_all()
                        if status.state in TERMINAL_ROUND:
                            return
                finally:
                    self._calls.discard(call)
            except grpc.RpcError as exc:
                if self.closed or exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                                                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                    view = self.rounds.get(rid)
                    if view is not None and not self.closed:
                        st = common_pb2.RoundStatus()
                        st.CopyFrom(view.status)
                        st.state, st.message = common_pb2.ROUND_STATE_FAILED, f"cannot follow: {error_text(exc)}"
                        self.rounds[rid] = RoundView(rid, task_id, st)
                        self.notify()
                    return
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, 5.0)

    def _fetch_submissions(self, rid: str) -> dict[str, gateway_pb2.Submission]:
        out = {}
        for sid, v in list(self.submissions.items()):
            if v.submission.round_id == rid:
                try:
                    out[sid] = self.contributor().get_submission(sid)
                except grpc.RpcError:
                    pass  # the submission's own watcher retries
        return out

    def follow_submission(self, sub_id: str) -> None:
        """A contributor's submission: poll GetSubmission until a round takes it, then follow the
        round's stream; a failed round puts the records back to pending, so keep polling."""
        threading.Thread(target=self._watch_submission, args=(sub_id,), name=f"web-sub-{sub_id}",
                         daemon=True).start()

    def _watch_submission(self, sub_id: str) -> None:
        client = self.contributor()
        followed = ""
        while not self.closed:
            try:
                sub = client.get_submission(sub_id)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._closed.wait(2.0)
                    continue
                return
            if sub.round_id and sub.round_id != followed:
                # Follow the round even when it already ended between two polls (a fast round): its
                # watcher gets the final status at once and publishes it with the submission's state.
                followed = sub.round_id
                if sub.round_id not in self.rounds:
                    self.follow_round(sub.task_id, common_pb2.RoundStatus(
                        task_id=sub.task_id, round_id=sub.round_id, state=common_pb2.ROUND_STATE_PENDING))
                continue
            view = self.submissions.get(sub_id)
            watched = self.rounds.get(sub.round_id)
            if (sub.state == gateway_pb2.SUBMISSION_STATE_SCORED and watched is not None
                    and watched.status.state not in TERMINAL_ROUND):
                # The round's watcher publishes its end and this state together.
                self._closed.wait(0.5)
                continue
            if view is not None and view.submission != sub:
                with self.changed:
                    view.submission = sub
                    self.changed.notify_all()
            if sub.state == gateway_pb2.SUBMISSION_STATE_SCORED:
                return
            self._closed.wait(1.0)

    # -- the live stream ------------------------------------------------------------------------
    def live_items(self, task_id: str) -> list[dict[str, Any]]:
        with self.changed:
            return self._live_items(task_id)

    def _live_items(self, task_id: str) -> list[dict[str, Any]]:
        items = [j.item() for j in list(self.jobs.values()) if j.task_id == task_id]
        items += [r.item() for r in list(self.rounds.values()) if r.task_id == task_id]
        for v in list(self.submissions.values()):
            s = v.submission
            if s.task_id == task_id:
                state = submission_state(s.state)
                items.append({"key": f"sub-{s.submission_id}", "state": state, "state_label": state.replace("_", " "),
                              "done": 0, "total": 0, "count": "", "text": s.round_id or "—"})
        return items
