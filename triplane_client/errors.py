"""Typed exceptions: the gRPC status code, the ErrorInfo reason, the field."""

from __future__ import annotations

import grpc

from triplane.runtime.status import parse_rpc_error


class TriplaneApiError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, field: str, message: str) -> None:
        super().__init__(f"{code.name} {reason or '-'} {field or '-'}: {message}")
        self.code = code
        self.reason = reason
        self.field = field
        self.message = message


class InvalidArgumentError(TriplaneApiError):
    pass


class NotFoundError(TriplaneApiError):
    pass


class AlreadyExistsError(TriplaneApiError):
    pass


class FailedPreconditionError(TriplaneApiError):
    pass


class UnavailableError(TriplaneApiError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TriplaneApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> TriplaneApiError:
    reason, field = parse_rpc_error(error)
    cls = _BY_CODE.get(error.code(), TriplaneApiError)
    return cls(error.code(), reason, field, error.details() or "")
