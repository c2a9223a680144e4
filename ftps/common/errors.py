"""Domain errors, each tied to the status a caller is answered with, and a stable reason.

Domain code raises these (it never builds statuses, nor imports grpc): each class names its status
:class:`Code`, and :mod:`ftps.common.rpc_status` (the one place that knows gRPC statuses) maps them to
``grpc.StatusCode`` with the rich status (``google.rpc.ErrorInfo`` with the reason, ``BadRequest``
naming the field, ``RetryInfo``), and maps other services' statuses back to these.
:data:`REASONS` is the one table of reasons (``python -m ftps.common.errors --markdown`` prints it
for the README).
"""

from __future__ import annotations

import enum
import sys
from typing import Mapping

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
    "TOO_FEW_CONTRIBUTORS": ("FAILED_PRECONDITION", "A task with contributor-level masks has records of too few contributors pending for a round.", False),
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


class Code(enum.Enum):
    """The status codes domain errors are answered with (gRPC's names, which HTTP/JSON gateways
    and other languages share)."""

    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"


def check_reason(reason: str, code: Code) -> str:
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

    code: Code = Code.INTERNAL
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
    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(FtpsError):
    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(FtpsError):
    code = Code.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(FtpsError):
    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(FtpsError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(FtpsError):
    code = Code.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(FtpsError):
    code = Code.UNAUTHENTICATED
    reason = "TOKEN_INVALID"


class Unavailable(FtpsError):
    code = Code.UNAVAILABLE
    reason = "UNAVAILABLE"


class DataLoss(FtpsError):
    """Stored bytes do not match their checksum."""

    code = Code.DATA_LOSS
    reason = "DATA_LOSS"


# The domain error of each code (the base class, INTERNAL, has none: it is never relayed as such).
BY_CODE: dict[Code, type[FtpsError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                              PermissionDenied, Unauthenticated, Unavailable, DataLoss)}


# What a caller is told when a service behind this one did not answer (its address stays in the log).
UPSTREAM_UNAVAILABLE = "temporarily unavailable, retry"


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
