"""Domain errors and the one place that maps them to gRPC statuses.

Domain code raises `TriplaneError` subclasses and never imports grpc. The
server's `ErrorMappingInterceptor` turns them into a `google.rpc.Status` with an
`ErrorInfo` (machine-readable reason) and a `BadRequest` field violation (the
offending field), so no client error ever reaches a caller as UNKNOWN/INTERNAL.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from triplane.runtime.interceptors import UnaryWrappingInterceptor

ERROR_DOMAIN = "triplane.dev"
log = logging.getLogger("triplane.errors")


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


class TriplaneError(Exception):
    """A domain error with a canonical code, a reason and the field at fault."""

    code: Code = Code.INTERNAL

    def __init__(
        self, reason: str, message: str, field: str = "", metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        assert reason.isupper() or "_" in reason, reason
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})

    def with_field_prefix(self, prefix: str) -> TriplaneError:
        """The same error with `prefix` put before its field path."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        clone = type(self)(self.reason, self.message, field, self.metadata)
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
    )
}


def error_for(code: int, reason: str, message: str, field: str = "") -> TriplaneError:
    """Rebuilds a domain error from its parts (e.g. a remembered failure)."""
    cls = _BY_CODE.get(Code(code), TriplaneError)
    err = cls(reason, message, field)
    err.code = Code(code)
    return err


def to_status_proto(err: TriplaneError) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(
        reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata
    )
    if err.field:
        info.metadata["field"] = err.field
    details = [info]
    packed: list[any_pb2.Any] = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    if err.field:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=err.field, description=err.message, reason=err.reason
                )
            ]
        )
        item = any_pb2.Any()
        item.Pack(bad)
        packed.append(item)
    return status_pb2.Status(code=int(err.code), message=err.message, details=packed)


def to_grpc_status(err: TriplaneError) -> grpc.Status:
    return rpc_status.to_status(to_status_proto(err))


def parse_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> tuple[str, str]:
    """(reason, field) carried by an error from a Triplane server; ("", "") if none."""
    status = rpc_status.from_call(error)
    if status is None:
        return "", ""
    reason, field = "", ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            field = field or info.metadata.get("field", "")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
    return reason, field


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _wrap_unary(behavior: Handler) -> Handler:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except TriplaneError as err:
            await context.abort_with_status(to_grpc_status(err))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in %s", getattr(behavior, "__qualname__", behavior))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapped


class ErrorMappingInterceptor(UnaryWrappingInterceptor):
    """Maps TriplaneError raised by unary-unary handlers to rich statuses."""

    def wrap(self, method: str, behavior: Handler) -> Handler:
        return _wrap_unary(behavior)
