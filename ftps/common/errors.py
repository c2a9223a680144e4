"""Domain errors, each tied to the gRPC status a servicer answers with, and a stable reason.

Domain code raises these (it never builds statuses); the servicer decorator in
:mod:`ftps.common.grpcutil` answers with the status code and message, plus the rich status
(``google.rpc.ErrorInfo`` with the reason, ``BadRequest`` naming the field, ``RetryInfo``) built by
:func:`rich_status`, the one place that builds them. :func:`error_details` reads them back on the
client side. :data:`REASONS` is the one table of reasons (``python -m ftps.common.errors --markdown``
prints it for the README).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Mapping, NoReturn

import grpc

log = logging.getLogger(__name__)

DOMAIN = "ftps.v1"
# A service that is not there right now usually is again within a second or two.
UNAVAILABLE_RETRY_S = 1.0

# reason -> (status code name, one-line meaning, whether retrying the same call can help).
# The single home of reasons: raising with one that is not here fails (ValueError).
REASONS: dict[str, tuple[str, str, bool]] = {
    # INVALID_ARGUMENT: the request itself is wrong; the same request fails again.
    "INVALID_ARGUMENT": ("INVALID_ARGUMENT", "A request field is not valid (generic; the message says which).", False),
    "FIELD_REQUIRED": ("INVALID_ARGUMENT", "A required request field is missing.", False),
    "INVALID_ID": ("INVALID_ARGUMENT", "An id is not 1-64 of letters, digits, '_', '-', '.'.", False),
    "INVALID_PAGE_TOKEN": ("INVALID_ARGUMENT", "page_token is not one the same call returned.", False),
    "INVALID_SETTINGS": ("INVALID_ARGUMENT", "Task settings are out of bounds or cannot produce a score.", False),
    "UNKNOWN_METHOD": ("INVALID_ARGUMENT", "A scoring method is not a known one.", False),
    "TENSOR_INVALID": ("INVALID_ARGUMENT", "A tensor's dtype, shape or bytes are not valid.", False),
    "ARCHIVE_INVALID": ("INVALID_ARGUMENT", "An npz or safetensors payload is malformed or over its limits.", False),
    "RECORDS_BAD_SHAPE": ("INVALID_ARGUMENT", "Records do not have the task's record shape (or x and y disagree).", False),
    "RECORDS_BAD_DTYPE": ("INVALID_ARGUMENT", "Records x is not float32/float64, or y is not integer labels.", False),
    "RECORDS_EMPTY": ("INVALID_ARGUMENT", "A request holds no records.", False),
    "RECORDS_NOT_FINITE": ("INVALID_ARGUMENT", "A record value is NaN or infinite as float32.", False),
    "RECORDS_OUT_OF_RANGE": ("INVALID_ARGUMENT", "A record value is outside the task's value range.", False),
    "LABEL_OUT_OF_RANGE": ("INVALID_ARGUMENT", "A label is outside [0, num_classes).", False),
    "BLOB_KIND_INVALID": ("INVALID_ARGUMENT", "An upload's kind is not a blob kind.", False),
    "BLOB_SIZE_MISMATCH": ("INVALID_ARGUMENT", "An upload's bytes differ from its declared size.", False),
    "BLOB_CHECKSUM_MISMATCH": ("INVALID_ARGUMENT", "An upload's sha256 differs from its declared one.", False),
    "UPLOAD_OUT_OF_ORDER": ("INVALID_ARGUMENT", "An upload stream does not start with its header, or repeats it.", False),
    "BASE_MODEL_INVALID": ("INVALID_ARGUMENT", "A base model is not usable safetensors (empty, NaN or infinite weights).", False),
    "STRATEGY_INVALID": ("INVALID_ARGUMENT", "A strategy is not UTF-8 Python source without syntax errors.", False),
    "BUILDER_DATA_INVALID": ("INVALID_ARGUMENT", "Builder data is malformed or has too few records.", False),
    "JOB_INVALID": ("INVALID_ARGUMENT", "A fine-tuning job is malformed (internal call).", False),
    "WORKER_OUTPUT_INVALID": ("INVALID_ARGUMENT", "A fine-tune worker returned results of the wrong shape.", False),
    "OBJECT_KEY_INVALID": ("INVALID_ARGUMENT", "An object key or blob folder is not a valid one.", False),
    # NOT_FOUND / ALREADY_EXISTS
    "NOT_FOUND": ("NOT_FOUND", "Something named by the request does not exist (generic).", False),
    "TASK_NOT_FOUND": ("NOT_FOUND", "No such task (only privileged callers are told so).", False),
    "ROUND_NOT_FOUND": ("NOT_FOUND", "No such round.", False),
    "SUBMISSION_NOT_FOUND": ("NOT_FOUND", "No such submission.", False),
    "PREPARATION_NOT_FOUND": ("NOT_FOUND", "The task has no offline preparation for its current base model.", False),
    "OBJECT_NOT_FOUND": ("NOT_FOUND", "A stored object does not exist.", False),
    "ALREADY_EXISTS": ("ALREADY_EXISTS", "It exists already (generic).", False),
    "TASK_ALREADY_EXISTS": ("ALREADY_EXISTS", "A task with this id exists already.", False),
    # FAILED_PRECONDITION: the request is fine, the state is not (yet).
    "FAILED_PRECONDITION": ("FAILED_PRECONDITION", "The system is not in a state that allows the call (generic).", False),
    "TASK_NOT_READY": ("FAILED_PRECONDITION", "The task lacks uploads, or its base model was not checked against its strategy.", False),
    "TOO_FEW_RECORDS": ("FAILED_PRECONDITION", "Not enough records are pending for a round.", False),
    "MODEL_CHECK_FAILED": ("FAILED_PRECONDITION", "The base model, strategy or data do not work together.", False),
    "STRATEGY_FAILED": ("FAILED_PRECONDITION", "Fine-tuning failed on the round's models.", False),
    "PREPARATION_MISSING": ("FAILED_PRECONDITION", "A method needs the offline preparation, which is missing.", False),
    "PREPARATION_FAILED": ("FAILED_PRECONDITION", "The preparation stage a round waited for failed; its message says why.", False),
    # RESOURCE_EXHAUSTED: over a limit; some clear (retry later), some need a smaller request.
    "RESOURCE_EXHAUSTED": ("RESOURCE_EXHAUSTED", "Over a limit (generic).", False),
    "TOO_MANY_RECORDS": ("RESOURCE_EXHAUSTED", "More records in one request (or one UploadBuilderData chunk) than the service takes.", False),
    "QUOTA_EXCEEDED": ("RESOURCE_EXHAUSTED", "A contributor's pending records would exceed the quota (retry after a round).", True),
    "BLOB_TOO_LARGE": ("RESOURCE_EXHAUSTED", "An upload is larger than its kind's limit.", False),
    "STREAMS_EXHAUSTED": ("RESOURCE_EXHAUSTED", "The caller has too many open streams on the service (RetryInfo says when).", True),
    "SERVICE_BUSY": ("RESOURCE_EXHAUSTED", "The service is at its limit of calls in progress (RetryInfo says when).", True),
    # PERMISSION_DENIED / UNAUTHENTICATED
    "PERMISSION_DENIED": ("PERMISSION_DENIED", "The caller's role or token scope does not allow the call (also for others' tasks).", False),
    "TOKEN_MISSING": ("UNAUTHENTICATED", "The call carries no bearer token.", False),
    "TOKEN_INVALID": ("UNAUTHENTICATED", "The token is malformed, badly signed or names an unknown role.", False),
    "TOKEN_EXPIRED": ("UNAUTHENTICATED", "The token has expired: get a new one.", False),
    # UNAVAILABLE: try again (RetryInfo says when, 1 s unless stated).
    "UNAVAILABLE": ("UNAVAILABLE", "Temporarily unavailable (generic).", True),
    "UPSTREAM_UNAVAILABLE": ("UNAVAILABLE", "A service this one depends on did not answer.", True),
    "STORE_UNAVAILABLE": ("UNAVAILABLE", "The object store is unreachable or failing.", True),
    "DATABASE_UNAVAILABLE": ("UNAVAILABLE", "The database is unreachable.", True),
    "WORKERS_UNAVAILABLE": ("UNAVAILABLE", "No fine-tune worker could run the job.", True),
    "ROUND_START_DELAYED": ("UNAVAILABLE", "A round took too long to start; its records are pending again.", True),
    # DATA_LOSS / INTERNAL
    "DATA_LOSS": ("DATA_LOSS", "Stored data is lost (generic).", False),
    "BLOB_CORRUPT": ("DATA_LOSS", "A stored object does not match its checksum or size, or has none.", False),
    "INTERNAL": ("INTERNAL", "An unexpected error; the message and metadata name an incident id for the logs.", False),
}


def check_reason(reason: str, code: grpc.StatusCode) -> str:
    """``reason`` if the table has it for ``code``; ValueError (a bug at the raise site) if not."""
    entry = REASONS.get(reason)
    if entry is None:
        raise ValueError(f"error reason {reason!r} is not in ftps.common.errors.REASONS")
    if entry[0] != code.name:
        raise ValueError(f"error reason {reason!r} is for {entry[0]}, not {code.name}")
    return reason


class FtpsError(Exception):
    """Base of every error a caller should see with a precise status. The base class itself
    (INTERNAL) is never shown: the caller gets an incident id, the log gets the message.

    ``reason``: one of :data:`REASONS` for this class's code (default: the class's own);
    ``field``: the request field at fault (a ``BadRequest`` field violation); ``metadata``: strings
    for ``ErrorInfo.metadata``; ``retry_after_s``: advice sent as ``RetryInfo``."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str = "", *, reason: str | None = None, field: str = "",
                 metadata: Mapping[str, str] | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = check_reason(reason, self.code)
        self.field = field
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.retry_after_s = retry_after_s


class InvalidArgument(FtpsError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(FtpsError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(FtpsError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(FtpsError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(FtpsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(FtpsError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(FtpsError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "TOKEN_INVALID"


class Unavailable(FtpsError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DataLoss(FtpsError):
    """Stored bytes do not match their checksum."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"


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
        return Unavailable(UPSTREAM_UNAVAILABLE, reason="UPSTREAM_UNAVAILABLE",
                           retry_after_s=error_details(exc).retry_after_s)
    cls = _BY_CODE.get(code, FtpsError) if code != grpc.StatusCode.UNAUTHENTICATED else FtpsError
    if cls is FtpsError:
        log.warning("%s answered %s: %s", context or "a service", name, details)
        return FtpsError(f"{context or 'a service'} answered {name}: {details}")  # for the log only
    log.debug("%s answered %s: %s", context or "a service", name, details)
    return relayed(cls, exc, details)


def relayed(cls: type[FtpsError], exc: grpc.RpcError, message: str) -> FtpsError:
    """``cls(message)`` keeping what another service said about it: its reason (when it is one of
    ours for ``cls``'s code), the field at fault, its metadata and retry advice."""
    info = error_details(exc)
    entry = REASONS.get(info.reason)
    ok = info.domain == DOMAIN and entry is not None and entry[0] == cls.code.name
    return cls(message, reason=info.reason if ok else None,
               field=info.field_violations[0][0] if info.field_violations else "",
               metadata=info.metadata if ok else None, retry_after_s=info.retry_after_s)


# -- the rich status: built here only, read back by error_details ------------------------------

def rich_status(code: grpc.StatusCode, message: str, reason: str, *,
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

    details = [pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {})))]
    if field:
        details.append(pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)])))
    if retry_after_s is None and code == grpc.StatusCode.UNAVAILABLE:
        retry_after_s = UNAVAILABLE_RETRY_S
    if retry_after_s is not None:
        seconds = max(0.0, float(retry_after_s))
        details.append(pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(seconds), nanos=round((seconds % 1) * 1e9) % 1_000_000_000))))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


def status_of(exc: FtpsError) -> grpc.Status:
    """The rich status of a domain error (not of INTERNAL: see :func:`internal_status`)."""
    return rich_status(exc.code, str(exc), exc.reason, metadata=exc.metadata, field=exc.field,
                       retry_after_s=exc.retry_after_s)


def internal_status(incident: str) -> grpc.Status:
    return rich_status(grpc.StatusCode.INTERNAL, f"internal error, incident {incident}", "INTERNAL",
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


def markdown_table() -> str:
    """:data:`REASONS` as the README's table."""
    rows = ["| reason | status code | meaning | retry? |", "|---|---|---|---|"]
    rows += [f"| `{r}` | {code} | {meaning} | {'yes' if retry else 'no'} |"
             for r, (code, meaning, retry) in REASONS.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        print("usage: python -m ftps.common.errors --markdown", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(markdown_table())
