"""Typed exceptions: the gRPC status code, the ErrorInfo reason, the field,
and for credentials and limits what to do about them (the missing scope, the
wait before a retry)."""

from __future__ import annotations

import grpc

from triplane.runtime.status import error_details


class TriplaneApiError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        field: str,
        message: str,
        metadata: dict[str, str] | None = None,
        retry_delay_s: float = 0.0,
    ) -> None:
        super().__init__(f"{code.name} {reason or '-'} {field or '-'}: {message}")
        self.code = code
        self.reason = reason
        self.field = field
        self.message = message
        # ErrorInfo.metadata, e.g. {"scope": "payments:write"}.
        self.metadata = dict(metadata or {})
        # google.rpc.RetryInfo: how long to wait before trying again (0: none said).
        self.retry_delay_s = retry_delay_s


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


class UnauthenticatedError(TriplaneApiError):
    """No API key (or token), or one the gateway does not take: `reason` says
    which (CREDENTIAL_MISSING, CREDENTIAL_CHECKSUM_INVALID, CREDENTIAL_REVOKED,
    CREDENTIAL_EXPIRED, CREDENTIAL_ROTATED, TOKEN_EXPIRED, ...)."""


class PermissionDeniedError(TriplaneApiError):
    """The credential may not do this: TENANT_MISMATCH (the request named
    another tenant than the key's) or SCOPE_MISSING (`scope` names it)."""

    @property
    def scope(self) -> str:
        return self.metadata.get("scope", "")


class ResourceExhaustedError(TriplaneApiError):
    """A limit was reached; for RATE_LIMITED, `retry_delay_s` says how long
    to wait."""


_BY_CODE: dict[grpc.StatusCode, type[TriplaneApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> TriplaneApiError:
    details = error_details(error)
    cls = _BY_CODE.get(error.code(), TriplaneApiError)
    return cls(
        error.code(),
        details.reason,
        details.field,
        error.details() or "",
        details.metadata,
        details.retry_delay_s,
    )
