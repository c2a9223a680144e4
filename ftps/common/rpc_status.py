"""Domain errors as gRPC statuses and back: the one place that knows ``grpc.StatusCode``.

A servicer's error becomes its status here (:func:`status_of`, :func:`abort`: the code and message
plain gRPC clients see, plus the rich status: ``google.rpc.ErrorInfo`` with the reason, domain
``ftps.v1`` and metadata, ``BadRequest`` naming the field, ``RetryInfo``); another service's status
becomes the matching domain error (:func:`from_rpc_error`, :func:`relayed`) so that it can be relayed
without naming that service; a client reads what a status says with :func:`error_details`.
The errors themselves, and the table of reasons, are :mod:`ftps.common.errors` (no grpc there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Mapping, NoReturn

import grpc

from ftps.common.errors import (BY_CODE, DOMAIN, REASONS, UNAVAILABLE_RETRY_S, UPSTREAM_UNAVAILABLE, Code,
                                FtpsError, Unavailable)

log = logging.getLogger(__name__)


def grpc_code(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def domain_code(code: grpc.StatusCode) -> Code | None:
    """The domain code of a gRPC status code, or None for one no domain error carries."""
    return Code.__members__.get(code.name) if isinstance(code, grpc.StatusCode) else None


def from_rpc_error(exc: grpc.RpcError, *, context: str = "") -> FtpsError:
    """The domain error for a status another service answered with, so it can be relayed to the
    caller without naming that service.

    ``context`` (which service, which target) goes to the log line only: client-facing messages
    never name internal services or addresses. UNAVAILABLE and DEADLINE_EXCEEDED (often written by
    gRPC itself, with the address it could not reach) become one fixed message; UNAUTHENTICATED
    (this service's own token refused: a deployment fault, not the caller's) and anything else
    without a domain error become INTERNAL, which the ``rpc`` decorator answers with an incident id.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.warning("%s answered %s: %s", context or "a service", name, details)
        return Unavailable(UPSTREAM_UNAVAILABLE, reason="UPSTREAM_UNAVAILABLE",
                           retry_after_s=error_details(exc).retry_after_s)
    mapped = domain_code(code)
    cls = BY_CODE.get(mapped, FtpsError) if mapped is not None and mapped is not Code.UNAUTHENTICATED else FtpsError
    if cls is FtpsError:
        log.warning("%s answered %s: %s", context or "a service", name, details)
        return FtpsError(f"{context or 'a service'} answered {name}: {details}")  # for the log only
    log.debug("%s answered %s: %s", context or "a service", name, details)
    return relayed(cls, exc, details)


# What a call answered when another replica of the same service may well succeed: it went away or
# is overloaded (pod killed, process died, queue full), or gave up on time.
_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED})
# What a call answered when the request itself failed: the same request fails on every replica.
_REQUEST_FAILED = (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION)


def retry_elsewhere(exc: grpc.RpcError) -> bool:
    """Whether a failed call may succeed on another replica of the service."""
    return callable(getattr(exc, "code", None)) and exc.code() in _ELSEWHERE


def request_failed(exc: grpc.RpcError) -> FtpsError | None:
    """The domain error, reason kept, when the call failed because of the request itself
    (INVALID_ARGUMENT, FAILED_PRECONDITION: retrying anywhere fails the same); None otherwise."""
    code = domain_code(exc.code()) if callable(getattr(exc, "code", None)) else None
    if code not in _REQUEST_FAILED:
        return None
    return relayed(BY_CODE[code], exc, exc.details() or "")


def relayed(cls: type[FtpsError], exc: grpc.RpcError, message: str) -> FtpsError:
    """``cls(message)`` keeping what another service said about it: its reason (when it is one of
    ours for ``cls``'s code), the field at fault, its metadata and retry advice."""
    info = error_details(exc)
    entry = REASONS.get(info.reason)
    ok = info.domain == DOMAIN and entry is not None and entry[0] == cls.code.value
    return cls(message, reason=info.reason if ok else None,
               field=info.field_violations[0][0] if info.field_violations else "",
               metadata=info.metadata if ok else None, retry_after_s=info.retry_after_s)


# -- the rich status: built here only, read back by error_details ------------------------------

def rich_status(code: Code | grpc.StatusCode, message: str, reason: str, *,
                metadata: Mapping[str, str] | None = None, field: str = "",
                retry_after_s: float | None = None) -> grpc.Status:
    """The status a servicer answers with: ``code`` and ``message`` as plain gRPC clients see them,
    plus ``google.rpc.ErrorInfo`` (reason, domain ``ftps.v1``, metadata) always, ``BadRequest``
    (one field violation) when ``field`` is set, ``RetryInfo`` when ``retry_after_s`` is (1 s by
    default on UNAVAILABLE)."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    def pack(msg) -> any_pb2.Any:
        detail = any_pb2.Any()
        detail.Pack(msg)
        return detail

    message = _bounded(message)
    details = [pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {})))]
    if field:
        details.append(pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)])))
    code = grpc_code(code) if isinstance(code, Code) else code
    if retry_after_s is None and code == grpc.StatusCode.UNAVAILABLE:
        retry_after_s = UNAVAILABLE_RETRY_S
    if retry_after_s is not None:
        seconds = max(0.0, float(retry_after_s))
        details.append(pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(seconds), nanos=round((seconds % 1) * 1e9) % 1_000_000_000))))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


# The message travels twice in the trailers (grpc-message and inside grpc-status-details-bin), whose
# total gRPC clients refuse past 8 KiB: a longer one (a strategy's output tail) is cut here.
_MAX_MESSAGE_CHARS = 3000


def _bounded(message: str) -> str:
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    # The head says what failed, the tail is the last output before it: keep both, cut the middle.
    head = _MAX_MESSAGE_CHARS // 3
    return message[:head] + " … (cut) … " + message[-(_MAX_MESSAGE_CHARS - head - 11):]


def status_of(exc: FtpsError) -> grpc.Status:
    """The rich status of a domain error (not of INTERNAL: see :func:`internal_status`)."""
    return rich_status(exc.code, str(exc), exc.reason, metadata=exc.metadata, field=exc.field,
                       retry_after_s=exc.retry_after_s)


def internal_status(incident: str) -> grpc.Status:
    return rich_status(Code.INTERNAL, f"internal error, incident {incident}", "INTERNAL",
                       metadata={"incident": incident})


def abort(context: grpc.ServicerContext, exc: FtpsError) -> NoReturn:
    """End the call with ``exc``'s rich status (raises, like ``context.abort``)."""
    context.abort_with_status(status_of(exc))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - it raises


@dataclass(frozen=True)
class ErrorDetails:
    """What a status says beyond its code and message (empty when the server sent none)."""

    code: str = ""
    message: str = ""
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = dataclass_field(default_factory=dict)
    field_violations: list[tuple[str, str]] = dataclass_field(default_factory=list)  # (field, description)
    retry_after_s: float | None = None


def error_details(exc: grpc.RpcError) -> ErrorDetails:
    """The reason, field violations and retry advice of a failed call (client side)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else ""
    message = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    try:
        status = rpc_status.from_call(exc)
    except (ValueError, AttributeError, TypeError):
        status = None
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry: float | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry = info_r.retry_delay.seconds + info_r.retry_delay.nanos / 1e9
    return ErrorDetails(name, message or "", reason, domain, metadata, violations, retry)


def retry_after(exc: grpc.RpcError) -> float | None:
    """The server's retry advice (``google.rpc.RetryInfo``) on a failed call, in seconds; None without."""
    return error_details(exc).retry_after_s
