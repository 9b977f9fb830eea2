"""Domain errors: a canonical code, a machine-readable reason and the field at
fault.

Domain code raises `TriplaneError` subclasses and never imports grpc (neither
does this module). `triplane.runtime.status` is the one place that turns them
into gRPC statuses (`ErrorMappingInterceptor`) and reads them back from a
failed call (`parse_rpc_error`).
"""

from __future__ import annotations

import enum

from google.rpc import code_pb2

ERROR_DOMAIN = "triplane.dev"


class Code(enum.IntEnum):
    """Canonical status codes used by the domain (values of google.rpc.Code)."""

    OK = code_pb2.OK
    CANCELLED = code_pb2.CANCELLED
    INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
    DEADLINE_EXCEEDED = code_pb2.DEADLINE_EXCEEDED
    NOT_FOUND = code_pb2.NOT_FOUND
    ALREADY_EXISTS = code_pb2.ALREADY_EXISTS
    PERMISSION_DENIED = code_pb2.PERMISSION_DENIED
    RESOURCE_EXHAUSTED = code_pb2.RESOURCE_EXHAUSTED
    FAILED_PRECONDITION = code_pb2.FAILED_PRECONDITION
    ABORTED = code_pb2.ABORTED
    OUT_OF_RANGE = code_pb2.OUT_OF_RANGE
    UNAVAILABLE = code_pb2.UNAVAILABLE
    INTERNAL = code_pb2.INTERNAL
    UNAUTHENTICATED = code_pb2.UNAUTHENTICATED


class TriplaneError(Exception):
    """A domain error with a canonical code, a reason and the field at fault.

    `retry_delay_s`, when above 0, tells the caller how long to wait before
    trying again (a rate limit): the status carries it as a
    `google.rpc.RetryInfo`."""

    code: Code = Code.INTERNAL

    def __init__(
        self,
        reason: str,
        message: str,
        field: str = "",
        metadata: dict[str, str] | None = None,
        *,
        retry_delay_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        assert reason.isupper() or "_" in reason, reason
        assert retry_delay_s >= 0, retry_delay_s
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})
        self.retry_delay_s = retry_delay_s

    def with_field_prefix(self, prefix: str) -> TriplaneError:
        """The same error with `prefix` put before its field path."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        clone = type(self)(
            self.reason, self.message, field, self.metadata, retry_delay_s=self.retry_delay_s
        )
        clone.code = self.code
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason}, field={self.field!r})"


class InvalidArgument(TriplaneError):
    code = Code.INVALID_ARGUMENT


class NotFound(TriplaneError):
    code = Code.NOT_FOUND


class AlreadyExists(TriplaneError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(TriplaneError):
    code = Code.FAILED_PRECONDITION


class OutOfRange(TriplaneError):
    code = Code.OUT_OF_RANGE


class PermissionDenied(TriplaneError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(TriplaneError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(TriplaneError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(TriplaneError):
    code = Code.UNAVAILABLE


class Aborted(TriplaneError):
    code = Code.ABORTED


class Unauthenticated(TriplaneError):
    """No credential, or one that is not valid (malformed, unknown, expired,
    revoked): the caller is not known, so nothing about the request is."""

    code = Code.UNAUTHENTICATED


_BY_CODE: dict[Code, type[TriplaneError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        OutOfRange,
        PermissionDenied,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Aborted,
        Unauthenticated,
    )
}


def error_for(code: int, reason: str, message: str, field: str = "") -> TriplaneError:
    """Rebuilds a domain error from its parts (e.g. a remembered failure)."""
    cls = _BY_CODE.get(Code(code), TriplaneError)
    err = cls(reason, message, field)
    err.code = Code(code)
    return err
