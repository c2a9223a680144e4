"""Domain errors, each tied to the gRPC status a servicer answers with.

Domain code raises these (it never imports grpc); the servicer decorator in
:mod:`ftps.common.grpcutil` maps them to ``context.abort(code, message)``.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class FtpsError(Exception):
    """Base of every error a caller should see with a precise status. The base class itself
    (INTERNAL) is never shown: the caller gets an incident id, the log gets the message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FtpsError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FtpsError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FtpsError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FtpsError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(FtpsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(FtpsError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(FtpsError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(FtpsError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(FtpsError):
    """Stored bytes do not match their checksum."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                      ResourceExhausted, PermissionDenied, Unauthenticated,
                                      Unavailable, DataLoss)}


UPSTREAM_UNAVAILABLE = "temporarily unavailable, retry"


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
        return Unavailable(UPSTREAM_UNAVAILABLE)
    cls = _BY_CODE.get(code, FtpsError) if code != grpc.StatusCode.UNAUTHENTICATED else FtpsError
    if cls is FtpsError:
        log.warning("%s answered %s: %s", context or "a service", name, details)
        return FtpsError(f"{context or 'a service'} answered {name}: {details}")  # for the log only
    log.debug("%s answered %s: %s", context or "a service", name, details)
    return cls(details)
