"""The one place where domain errors meet gRPC.

`ErrorMappingInterceptor` turns a `TriplaneError` raised by a handler into a
`google.rpc.Status` with an `ErrorInfo` (machine-readable reason) and a
`BadRequest` field violation (the offending field), and a `RetryInfo` when
the error says how long to wait (a rate limit), so no client error ever
reaches a caller as UNKNOWN/INTERNAL; `parse_rpc_error` and `error_details`
read them back from a failed call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from triplane.runtime.errors import ERROR_DOMAIN, TriplaneError
from triplane.runtime.interceptors import UnaryWrappingInterceptor

log = logging.getLogger("triplane.errors")


# The status travels in the response's trailers (grpc-message percent-encoded,
# grpc-status-details-bin in base64), which a gRPC client refuses beyond its
# metadata limit (8 KiB by default): the caller then sees RESOURCE_EXHAUSTED
# and cannot read why. An error message quoting a caller's 4,000-character
# value did that (found by the fuzz suite), so what a status echoes is cut to
# these many UTF-8 bytes.
MAX_STATUS_MESSAGE_BYTES = 512
MAX_STATUS_FIELD_BYTES = 256


def _bounded(text: str, max_bytes: int) -> str:
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode(errors="ignore") + "..."


def to_status_proto(err: TriplaneError) -> status_pb2.Status:
    message = _bounded(err.message, MAX_STATUS_MESSAGE_BYTES)
    field = _bounded(err.field, MAX_STATUS_FIELD_BYTES)
    info = error_details_pb2.ErrorInfo(
        reason=err.reason,
        domain=ERROR_DOMAIN,
        metadata={k: _bounded(v, MAX_STATUS_FIELD_BYTES) for k, v in err.metadata.items()},
    )
    if field:
        info.metadata["field"] = field
    details: list[Any] = [info]
    if err.retry_delay_s > 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_delay_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed: list[any_pb2.Any] = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    if field:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=field, description=message, reason=err.reason
                )
            ]
        )
        item = any_pb2.Any()
        item.Pack(bad)
        packed.append(item)
    return status_pb2.Status(code=int(err.code), message=message, details=packed)


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


@dataclasses.dataclass(frozen=True)
class ErrorDetails:
    """What a Triplane status carries besides its code and message."""

    reason: str = ""
    field: str = ""
    # ErrorInfo.metadata (e.g. "scope" of a PERMISSION_DENIED SCOPE_MISSING).
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # RetryInfo.retry_delay; 0.0 when the status has none.
    retry_delay_s: float = 0.0


def error_details(error: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Everything `to_status_proto` packed into a failed call's status."""
    status = rpc_status.from_call(error)
    if status is None:
        return ErrorDetails()
    reason, field_path, retry_delay_s = "", "", 0.0
    metadata: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
            field_path = field_path or info.metadata.get("field", "")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field_path = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(reason, field_path, metadata, retry_delay_s)


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
