"""Bounded work per caller: one server interceptor that caps a service's concurrent RPCs and each
caller's open streams, and ends streams that sat idle or lived too long.

Why each bound (DESIGN 5, availability): a threaded gRPC server runs every call on a thread of one
pool, and a stream holds its thread while it lasts. Without bounds one contributor's seventy
``WatchScores`` streams took every thread, and the other contributors' submits and the health
check waited behind them.

- **Concurrent RPCs per service** (``max_concurrent_rpcs``): a call beyond it is refused at once
  with ``RESOURCE_EXHAUSTED`` — the pool has a thread for it (see :data:`HEALTH_RESERVE`), so a
  refusal never waits behind stuck work.
- **Open streams per principal** (``max_streams_per_principal``): every streaming call (server,
  client or both) counts for its caller: the token's role and subject, or the peer's host where
  there is no principal (auth off; reflection). ``service`` principals are not capped: they are
  the deployment's own services (the gateway follows every running round on the scorer), and
  their calls still count towards the service's concurrency cap. Beyond it: ``RESOURCE_EXHAUSTED``
  with how many streams are open and when to retry, also as ``google.rpc.RetryInfo`` in the rich
  status (``grpc-status-details-bin``).
- **Idle and maximum stream lifetimes** (``stream_idle_s``, ``stream_max_s``): a stream that sent
  and received nothing for ``stream_idle_s`` (a client stream whose client has sent everything is
  not idle: the server is working on the answer), or that has lived ``stream_max_s``, is ended by
  the server. The handler sees ``context.is_active()`` turn False (the stream handlers poll it every
  second) and returns: the client sees the stream end with status OK before a terminal message,
  with trailing metadata ``ftps-stream-end: idle|max-lifetime``, and re-watches (``clients.api``
  does it by itself). Ending it cleanly, and not by cancelling, is why the handler does it: a
  cancelled call reads to the client as CANCELLED, like a fault. A handler that neither polls nor
  sends (reflection waiting on its client) is cancelled :data:`CANCEL_GRACE_S` later.

Health checks (``grpc.health.v1.Health``) are never limited or counted: probes must answer
whatever the load, and the stock servicer answers ``Check`` at once and ``Watch`` without a thread.
Reflection, which needs no token either, is limited like any call (per client address), so it
cannot take the threads health relies on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from ftps.common import rpc_status
from ftps.common.errors import ResourceExhausted

log = logging.getLogger("ftps.limits")

# Threads of the server's pool beyond max_concurrent_rpcs: admitted calls never hold them, so health
# checks and refusals always find one.
HEALTH_RESERVE = 16
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/",)
# Stream handlers poll is_active() every second; one that has not ended this long after its limit
# does not poll, and is cancelled.
CANCEL_GRACE_S = 5.0
STREAM_END_KEY = "ftps-stream-end"
# A refused unary call may come back soon: calls finish in milliseconds to seconds.
BUSY_RETRY_S = 1.0


@dataclass(frozen=True)
class Limits:
    """Per-service bounds (see the module docstring); 0 turns a lifetime off."""

    max_concurrent_rpcs: int = 64
    max_streams_per_principal: int = 8
    stream_idle_s: float = 300.0
    stream_max_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_concurrent_rpcs < 1 or self.max_streams_per_principal < 1:
            raise ValueError("max_concurrent_rpcs and max_streams_per_principal must be at least 1")
        if self.stream_idle_s < 0 or self.stream_max_s < 0:
            raise ValueError("stream_idle_s and stream_max_s must be >= 0 (0: no limit)")

    @classmethod
    def from_settings(cls, settings: Any) -> "Limits":
        return cls(max_concurrent_rpcs=settings.max_concurrent_rpcs,
                   max_streams_per_principal=settings.max_streams_per_principal,
                   stream_idle_s=settings.stream_idle_s, stream_max_s=settings.stream_max_s)

    @property
    def pool_size(self) -> int:
        """Threads of the server's pool: the admitted calls plus the reserve."""
        return self.max_concurrent_rpcs + HEALTH_RESERVE


class Refused(ResourceExhausted):
    """A call over a limit: RESOURCE_EXHAUSTED with ``message`` and ``reason``, retry after ``retry_s``."""

    def __init__(self, message: str, retry_s: float, reason: str = "SERVICE_BUSY") -> None:
        super().__init__(message, reason=reason, retry_after_s=retry_s)
        self.retry_s = retry_s


def caller_key(context: grpc.ServicerContext) -> tuple[str, bool]:
    """(who, capped): ``role:subject`` of the authenticated principal, else ``peer:HOST`` (the
    address without its port: a client opening many connections is still one caller)."""
    from ftps.common import auth

    # The principal the auth interceptor set for this call; None on methods it exempts (reflection).
    # Not auth.current(), which raises there. With auth switched off every caller is the one
    # AUTH_DISABLED principal: count them by address instead.
    principal = auth._current.get()
    if principal is not None and principal != getattr(auth, "AUTH_DISABLED", None):
        return f"{principal.role} {principal.subject!r}", principal.role != "service"
    peer = context.peer() or "unknown"  # "ipv4:1.2.3.4:PORT", "ipv6:[::1]:PORT", "unix:PATH"
    scheme, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if scheme in ("ipv4", "ipv6") else peer
    return f"peer {host}", True


class _Stream:
    """One open streaming call: when it started, when it last moved a message."""

    __slots__ = ("who", "context", "started", "last", "ended", "cancelled", "idle_free")

    def __init__(self, who: str, context: grpc.ServicerContext, now: float) -> None:
        self.who, self.context = who, context
        self.started = self.last = now
        self.ended = ""  # why the server ends it: "idle" | "max-lifetime"
        self.cancelled = False
        # A client stream whose client has sent everything: the server is working on the answer
        # (an upload's model check), not waiting on the caller, so it is not idle.
        self.idle_free = False


class RpcLimiter(grpc.ServerInterceptor):
    """Counts calls when their handler starts and releases them when it returns, so a call the
    client cancelled before its handler ran holds nothing. Goes after the auth interceptor (it
    reads the principal that one sets)."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._active = 0
        self._streams: dict[str, list[_Stream]] = {}
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()
        self.refused_total = 0
        self.ended_total = {"idle": 0, "max-lifetime": 0}
        self._last_warned: dict[str, float] = {}

    # -- accounting ----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"active_rpcs": self._active, "open_streams": sum(map(len, self._streams.values())),
                    "refused_total": self.refused_total, "ended_idle_total": self.ended_total["idle"],
                    "ended_max_lifetime_total": self.ended_total["max-lifetime"]}

    def _admit(self, stream: _Stream | None, capped: bool = True) -> None:
        lim = self.limits
        with self._lock:
            if stream is not None and capped:
                mine = self._streams.get(stream.who, [])
                if len(mine) >= lim.max_streams_per_principal:
                    self.refused_total += 1
                    retry = self._first_end_in(mine)
                    raise Refused(f"too many open streams: {stream.who} has {len(mine)} open on this service "
                                  f"(at most {lim.max_streams_per_principal}); close one, or retry in "
                                  f"{retry:.0f}s when the first of them ends", retry, "STREAMS_EXHAUSTED")
            if self._active >= lim.max_concurrent_rpcs:
                self.refused_total += 1
                raise Refused(f"service busy: {self._active} calls in progress (at most "
                              f"{lim.max_concurrent_rpcs}); retry in {BUSY_RETRY_S:.0f}s", BUSY_RETRY_S,
                              "SERVICE_BUSY")
            self._active += 1
            if stream is not None:
                self._streams.setdefault(stream.who, []).append(stream)
                if self._reaper is None and (lim.stream_idle_s or lim.stream_max_s):
                    self._reaper = threading.Thread(target=self._reap, name="stream-reaper", daemon=True)
                    self._reaper.start()

    def _release(self, stream: _Stream | None) -> None:
        with self._lock:
            self._active -= 1
            if stream is not None:
                mine = self._streams.get(stream.who, [])
                if stream in mine:
                    mine.remove(stream)
                if not mine:
                    self._streams.pop(stream.who, None)
                if stream.ended:
                    self.ended_total[stream.ended] += 1

    def _first_end_in(self, streams: list[_Stream]) -> float:
        """Seconds until the first of ``streams`` reaches a lifetime (1 s at least)."""
        ends = [self._end_at(s) for s in streams]
        ends = [e for e in ends if e is not None]
        return max(1.0, math.ceil(min(ends) - self._clock())) if ends else BUSY_RETRY_S * 30

    def _end_at(self, s: _Stream) -> float | None:
        lim = self.limits
        ends = ([s.last + lim.stream_idle_s] if lim.stream_idle_s and not s.idle_free else []) + \
               ([s.started + lim.stream_max_s] if lim.stream_max_s else [])
        return min(ends) if ends else None

    def _expired(self, s: _Stream) -> bool:
        """Marks ``s`` ended once it is past a lifetime (and keeps it so)."""
        if not s.ended:
            now, lim = self._clock(), self.limits
            if lim.stream_max_s and now - s.started >= lim.stream_max_s:
                s.ended = "max-lifetime"
            elif lim.stream_idle_s and not s.idle_free and now - s.last >= lim.stream_idle_s:
                s.ended = "idle"
        return bool(s.ended)

    def _reap(self) -> None:
        """Backstop for handlers that neither poll is_active() nor send: cancel them a grace
        period after their limit. Runs while streams are open, one thread per server."""
        while not self._closed.wait(1.0):
            with self._lock:
                if not self._streams:
                    self._reaper = None
                    return
                overdue = [s for mine in self._streams.values() for s in mine
                           if not s.cancelled and self._expired(s)
                           and self._clock() - (self._end_at(s) or 0) >= CANCEL_GRACE_S]
                for s in overdue:
                    s.cancelled = True
            for s in overdue:
                log.warning("%s: a stream past its limit (%s) did not stop within %gs; cancelled", s.who,
                            s.ended, CANCEL_GRACE_S)
                s.context.cancel()

    def close(self) -> None:
        self._closed.set()

    def _warn(self, who: str, message: str) -> None:
        # One line per caller a minute: a flood must not also flood the log.
        now = self._clock()
        with self._lock:
            if now - self._last_warned.get(who, -math.inf) < 60:
                return
            if len(self._last_warned) > 1000:
                self._last_warned.clear()
            self._last_warned[who] = now
        log.warning("refused (%s): %s", who, message)

    # -- the interceptor -----------------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNLIMITED_PREFIXES):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._stream(handler.stream_unary, responses=False),
                                                        handler.request_deserializer, handler.response_serializer)
        behavior = handler.unary_stream or handler.stream_stream
        wrapped = self._stream(behavior, responses=True, requests=bool(handler.stream_stream))
        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(wrapped, handler.request_deserializer, handler.response_serializer)

    def _refuse(self, context: grpc.ServicerContext, who: str, exc: Refused) -> None:
        self._warn(who, str(exc))
        rpc_status.abort(context, exc)  # RESOURCE_EXHAUSTED with ErrorInfo and RetryInfo

    def _unary(self, behavior: Callable) -> Callable:
        def unary(request, context):
            try:
                self._admit(None)
            except Refused as exc:
                self._refuse(context, caller_key(context)[0], exc)
            try:
                return behavior(request, context)
            finally:
                self._release(None)
        return unary

    def _stream(self, behavior: Callable, *, responses: bool, requests: bool = True) -> Callable:
        def opened(context) -> tuple[_Stream, _StreamContext]:
            who, capped = caller_key(context)
            stream = _Stream(who, context, self._clock())
            try:
                self._admit(stream, capped)
            except Refused as exc:
                self._refuse(context, who, exc)
            return stream, _StreamContext(context, self, stream)

        def moving(it: Iterator, stream: _Stream) -> Iterator:
            # A client stream's messages count as activity.
            for message in it:
                stream.last = self._clock()
                yield message
            stream.idle_free = not responses

        def client_stream(request_iterator, context):
            stream, ctx = opened(context)
            try:
                return behavior(moving(request_iterator, stream), ctx)
            finally:
                self._release(stream)

        def server_stream(request, context):
            stream, ctx = opened(context)
            if requests:
                request = moving(request, stream)
            responses_ = None
            try:
                responses_ = behavior(request, ctx)
                for response in responses_ or ():
                    yield response
                    stream.last = self._clock()
                    if self._expired(stream):
                        break  # a handler that sends but does not poll is ended at its next message
            finally:
                close = getattr(responses_, "close", None)
                if close is not None:
                    close()
                if stream.ended and not stream.cancelled and context.is_active():
                    context.set_trailing_metadata(((STREAM_END_KEY, stream.ended),))
                self._release(stream)

        return server_stream if responses else client_stream


class _StreamContext:
    """The handler's context, whose ``is_active()`` turns False once the stream is past a lifetime."""

    def __init__(self, context: grpc.ServicerContext, limiter: RpcLimiter, stream: _Stream) -> None:
        self._context, self._limiter, self._stream = context, limiter, stream

    def is_active(self) -> bool:
        return self._context.is_active() and not self._limiter._expired(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


# Clients read the retry advice with rpc_status.error_details (or this, its short form).
retry_after = rpc_status.retry_after
