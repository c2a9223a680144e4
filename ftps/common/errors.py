"""Domain errors, each tied to the gRPC status a servicer answers with.

Domain code raises these (it never imports grpc); the servicer decorator in
:mod:`ftps.common.grpcutil` maps them to ``context.abort(code, message)``.
"""

from __future__ import annotations

import grpc


class FtpsError(Exception):
    """Base of every error a caller should see with a precise status."""

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


def from_rpc_error(exc: grpc.RpcError, *, context: str = "") -> FtpsError:
    """The domain error for a status another service answered with, so it can be relayed as is."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, FtpsError)
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        cls = Unavailable
    return cls(f"{context}: {details}" if context else details)
