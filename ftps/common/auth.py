"""Principals, signed expiring tokens, and the one server interceptor that checks them.

A token is ``base64url(json payload) + "." + base64url(HMAC-SHA256(key, payload))`` with payload
``{"sub", "role", "tasks", "iat", "exp"}``; it travels as ``authorization: Bearer <token>`` in gRPC
metadata. Every service of a deployment shares the signing key (a Kubernetes Secret; the embedded
stack generates one in its data dir). Services call each other with a ``service`` token they mint.

Roles: ``contributor`` (a subject, optionally limited to some tasks), ``builder`` (the tasks it
owns), ``admin`` (everything), ``service`` (the services themselves).

Wrong, expired or forged token: UNAUTHENTICATED. Right token, wrong resource: PERMISSION_DENIED —
decided by each service's domain code with :func:`current` and the helpers below.

Fail closed: a service without a signing key does not start unless auth is switched off by an
explicit setting (``auth_disabled``); then every caller is :data:`AUTH_DISABLED`. No code path
turns a missing principal into an admin: :func:`current` raises outside an authenticated call.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc

from ftps.common import rpc_status
from ftps.common.errors import NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger("ftps.auth")

ROLES = ("contributor", "builder", "admin", "service")
MAX_TOKEN_BYTES = 4096
# Health checks and reflection answer without a token (probes, grpcurl).
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str
    tasks: tuple[str, ...] = field(default=())  # empty: not limited to some tasks

    @property
    def is_privileged(self) -> bool:
        return self.role in ("admin", "service")

    def require_role(self, *roles: str, what: str) -> None:
        if self.role not in roles:
            raise PermissionDenied(f"{self.role} {self.subject!r} may not {what}")

    def may_see_task(self, task_id: str) -> bool:
        return not self.tasks or task_id in self.tasks


# The caller of every RPC of a service whose auth was switched off explicitly (``auth_disabled``,
# ``ftps-stack up --no-auth``). Named so that every log line and record it reaches says so; it is
# never a fallback for a missing principal.
AUTH_DISABLED = Principal("auth-disabled", "admin")


class NoPrincipal(RuntimeError):
    """:func:`current` outside an RPC served through an auth interceptor: a bug of the server's
    wiring, answered INTERNAL (never a reason to treat the caller as anyone)."""


class AuthNotConfigured(ValueError):
    """A service has neither a signing key nor auth switched off explicitly: it must not start."""


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("ftps_principal", default=None)


def current() -> Principal:
    """The caller of the RPC being served (set by :class:`AuthInterceptor` or, with auth switched
    off, :class:`NoAuthInterceptor`). Raises :class:`NoPrincipal` anywhere else."""
    p = _current.get()
    if p is None:
        raise NoPrincipal("auth.current() outside an authenticated call: the server has no auth interceptor, "
                          "or the caller is not an RPC handler")
    return p


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Decode unpadded base64url, accepting only the one spelling :func:`_b64` produces: the
    decoder alone also takes padding, '+' and '/', whitespace and set trailing bits, which would
    give one token many spellings (and a deny list or log match could be dodged)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the signing key must be at least 32 bytes")
        self._key = key

    def issue(self, subject: str, role: str, *, tasks: tuple[str, ...] | list[str] = (),
              ttl_s: float = 3600.0, now: float | None = None) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if not subject:
            raise ValueError("subject is required")
        iat = int(time.time() if now is None else now)
        payload = json.dumps({"sub": subject, "role": role, "tasks": list(tasks), "iat": iat,
                              "exp": iat + int(ttl_s)}, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 1:
            raise Unauthenticated("malformed token")
        body, sig = token.split(".")
        try:
            payload, signature = _unb64(body), _unb64(sig)
        except (ValueError, TypeError) as exc:
            raise Unauthenticated("malformed token") from exc
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise Unauthenticated("token signature is not valid")
        try:
            claims = json.loads(payload)
            subject, role, exp = str(claims["sub"]), str(claims["role"]), float(claims["exp"])
            tasks = tuple(str(t) for t in claims.get("tasks", []))
        except (ValueError, KeyError, TypeError) as exc:
            raise Unauthenticated("token claims are malformed") from exc
        if role not in ROLES:
            raise Unauthenticated(f"token role {role!r} is unknown")
        if (time.time() if now is None else now) >= exp:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED")
        return Principal(subject, role, tasks)


def load_key(*, key: str = "", key_file: str = "") -> bytes | None:
    """The signing key from a value (hex or any string of >= 32 chars) or a file; None if neither."""
    if key:
        try:
            return bytes.fromhex(key)
        except ValueError:
            return key.encode()
    if key_file:
        data = Path(key_file).read_bytes().strip()
        if not data:  # never let an empty file pass for "no key"
            raise AuthNotConfigured(f"auth key file {key_file} is empty")
        return data
    return None


def load_or_create_key_file(path: Path) -> bytes:
    """The embedded stack's key: generated on first start, kept (mode 0600) in its data dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


class ServiceTokens:
    """A service's own token, re-minted before it expires."""

    def __init__(self, signer: TokenSigner, subject: str, ttl_s: float = 3600.0) -> None:
        self._signer, self._subject, self._ttl = signer, subject, ttl_s
        self._token, self._exp = "", 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if time.time() > self._exp - self._ttl / 4:
                self._token = self._signer.issue(self._subject, "service", ttl_s=self._ttl)
                self._exp = time.time() + self._ttl
            return self._token


def token_from_metadata(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if not value.startswith("Bearer "):
                return ""
            return value[len("Bearer "):]
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Verifies the caller's token on every RPC except health and reflection, and makes the
    principal available to the handler through :func:`current`."""

    def __init__(self, signer: TokenSigner) -> None:
        self._signer = signer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        token = token_from_metadata(handler_call_details.invocation_metadata)
        try:
            if token is None:
                raise Unauthenticated("no token: send 'authorization: Bearer <token>' metadata",
                                      reason="TOKEN_MISSING")
            principal = self._signer.verify(token)
        except Unauthenticated as exc:
            log.warning("refused %s: %s", method, exc)
            return _refusal(handler, exc)
        return _with_principal(handler, principal)


class NoAuthInterceptor(grpc.ServerInterceptor):
    """Auth switched off explicitly (``auth_disabled``): every RPC runs as :data:`AUTH_DISABLED`,
    whatever token it carries, so that :func:`current` still names a principal that says so."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        return _with_principal(handler, AUTH_DISABLED)


def _refusal(handler: grpc.RpcMethodHandler, refused: Unauthenticated) -> grpc.RpcMethodHandler:
    def abort(request, context):
        rpc_status.abort(context, refused)  # UNAUTHENTICATED with its reason (TOKEN_EXPIRED, ...)

    def abort_stream(request, context):
        rpc_status.abort(context, refused)
        yield  # pragma: no cover

    return _replace(handler, abort, abort_stream)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    def wrap(behavior: Callable) -> Callable:
        def unary(request, context):
            token = _current.set(principal)
            try:
                return behavior(request, context)
            finally:
                _current.reset(token)
        return unary

    def wrap_stream(behavior: Callable) -> Callable:
        def stream(request, context):
            token = _current.set(principal)
            try:
                yield from behavior(request, context)
            finally:
                _current.reset(token)
        return stream

    return _replace(handler, None, None, wrap=wrap, wrap_stream=wrap_stream)


def _replace(handler, unary_fn, stream_fn, *, wrap=None, wrap_stream=None) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        fn = wrap(handler.unary_unary) if wrap else unary_fn
        return grpc.unary_unary_rpc_method_handler(fn, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        fn = wrap_stream(handler.unary_stream) if wrap_stream else stream_fn
        return grpc.unary_stream_rpc_method_handler(fn, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        fn = wrap(handler.stream_unary) if wrap else unary_fn
        return grpc.stream_unary_rpc_method_handler(fn, handler.request_deserializer, handler.response_serializer)
    fn = wrap_stream(handler.stream_stream) if wrap_stream else stream_fn
    return grpc.stream_stream_rpc_method_handler(fn, handler.request_deserializer, handler.response_serializer)


class CallDetails(grpc.ClientCallDetails):
    """A client call's details with other metadata (what client interceptors pass on)."""

    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Client interceptor adding ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str | Callable[[], str]) -> None:
        self._token = token if callable(token) else (lambda: token)

    def _details(self, details):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {self._token()}")]
        return CallDetails(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def denied(who: Principal, action: str, what: str) -> PermissionDenied:
    """The one refusal a non-privileged caller gets, whether ``what`` does not exist or is not its:
    the same status and words on every service, so no answer tells anyone what others have."""
    return PermissionDenied(f"{who.role} {who.subject!r} may not {action} {what}")


def authorize_task(who: Principal, task_id: str, owner: str, *, action: str,
                   contributors_may: bool = False) -> None:
    """The task rule every service applies: admins and services may do anything; a builder only
    on the tasks it owns; a contributor only where ``contributors_may``; both only on the tasks in
    their token's scope (when it names some)."""
    if who.is_privileged:
        return
    if who.may_see_task(task_id):
        if who.role == "builder" and owner == who.subject:
            return
        if who.role == "contributor" and contributors_may:
            return
    raise denied(who, action, f"task {task_id}")


def authorized_task(who: Principal, task_id: str, get_task: Callable[[str], Any], *, action: str,
                    contributors_may: bool = False) -> Any:
    """``get_task(task_id)`` once ``who`` may ``action`` it. An unknown task is NOT_FOUND only for
    privileged callers; everyone else gets exactly the refusal of a task that is not theirs."""
    if not who.is_privileged and not who.may_see_task(task_id):
        raise denied(who, action, f"task {task_id}")
    try:
        task = get_task(task_id)
    except NotFound:
        if who.is_privileged:
            raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id") from None
        raise denied(who, action, f"task {task_id}") from None
    authorize_task(who, task_id, task.owner, action=action, contributors_may=contributors_may)
    return task
