"""The one table from toolcell errors to gRPC status codes."""

from __future__ import annotations

import grpc

from toolcell import errors

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[errors.ToolcellError], grpc.StatusCode], ...] = (
    (errors.ToolNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvocationNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.SessionRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArguments, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvocationConflict, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.AuditUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.SecretError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ImageMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RuntimeMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.SourceUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.BackendError, grpc.StatusCode.INTERNAL),
    (errors.ToolcellError, grpc.StatusCode.INTERNAL),
)


# Trailing metadata key carrying the retry hint of a RESOURCE_EXHAUSTED error, in milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"


def status_for(exc: errors.ToolcellError) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
