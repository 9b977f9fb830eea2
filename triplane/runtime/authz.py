"""Who may call what: each plane's permission table, applied by one interceptor.

A caller's identity is the SPIFFE ID (the one `spiffe://` URI SAN) of the
client certificate it presented in the mutual TLS handshake, which gRPC has
already verified against the CA bundle; `runtime.tls.roles` says which
identities play which role (`gateway`, `admin`). A plane's table maps each of
its methods (`/package.Service/Method`) to the roles allowed to call it, and
DEFAULT DENY holds:

- a method not in the table is refused, PERMISSION_DENIED `METHOD_NOT_ALLOWED`;
- a caller whose identity plays none of the method's roles (or who has no
  certificate identity) is refused, PERMISSION_DENIED `IDENTITY_NOT_ALLOWED`;
- either way the handler never runs, so the answer carries no data.

Health and reflection stay open (probes, grpcurl). `PUBLIC` lets any caller
through to a plane's own credential check (the gateway's partner API keys).
With `runtime.tls: off` no caller can be identified: the table still refuses
unlisted methods, but every caller is let through as every role (local
debugging only).

The parsed identity of a certificate is cached by its bytes (bounded), so a
call costs a dictionary lookup after the first on a connection's certificate.
`peer_identity(context)` gives the same answer to any interceptor or handler.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from cryptography import x509

from triplane.runtime.errors import PermissionDenied, TriplaneError
from triplane.runtime.status import to_grpc_status

log = logging.getLogger("triplane.authz")

# Roles the permission tables name (runtime.tls.roles maps them to identities).
GATEWAY_ROLE = "gateway"
ADMIN_ROLE = "admin"
# The operator console: only the methods its pages call.
CONSOLE_ROLE = "console"
# Any caller, with or without a certificate: the plane's own credential layer
# decides (the gateway's public methods, behind its partner API keys).
PUBLIC = "*"

GATEWAY_AND_ADMIN = frozenset({GATEWAY_ROLE, ADMIN_ROLE})
ADMIN_ONLY = frozenset({ADMIN_ROLE})
ANY_CALLER = frozenset({PUBLIC})
ADMIN_AND_CONSOLE = frozenset({ADMIN_ROLE, CONSOLE_ROLE})
GATEWAY_ADMIN_AND_CONSOLE = frozenset({GATEWAY_ROLE, ADMIN_ROLE, CONSOLE_ROLE})

# Services every server keeps open: probes and tools must reach them.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
_OPEN_PREFIXES = tuple(f"/{service}/" for service in OPEN_SERVICES)

Permissions = Mapping[str, frozenset[str]]


def permissions(service: str, methods: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """A plane's table entries for one service: {method name: roles}."""
    return {f"/{service}/{method}": roles for method, roles in methods.items()}


def is_open(method: str) -> bool:
    return method.startswith(_OPEN_PREFIXES)


# ---- the peer's identity ----

DEFAULT_PEER_CACHE_ENTRIES = 4096


class PeerIdentityCache:
    """Certificate bytes -> the SPIFFE ID it carries (None when it carries no
    single spiffe:// URI SAN), bounded: the oldest entry goes first."""

    def __init__(self, max_entries: int = DEFAULT_PEER_CACHE_ENTRIES) -> None:
        assert max_entries >= 1
        self.max_entries = max_entries
        self._identities: dict[bytes, str | None] = {}

    def identity_of(self, pem: bytes) -> str | None:
        try:
            return self._identities[pem]
        except KeyError:
            pass
        identity = _spiffe_id_of(pem)
        while len(self._identities) >= self.max_entries:
            del self._identities[next(iter(self._identities))]
        self._identities[pem] = identity
        return identity

    def __len__(self) -> int:
        return len(self._identities)


def _spiffe_id_of(pem: bytes) -> str | None:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = [
        uri
        for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith("spiffe://")
    ]
    # A SPIFFE certificate carries exactly one ID; anything else names no one.
    return uris[0] if len(uris) == 1 else None


PEER_CACHE = PeerIdentityCache()


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The SPIFFE ID of the client certificate this call's connection
    presented and gRPC verified; None without one (plaintext, or a client that
    presented none where that is allowed)."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    return PEER_CACHE.identity_of(pems[0])


def roles_by_identity(roles: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """runtime.tls.roles (role -> identities) turned around: identity -> roles."""
    found: dict[str, set[str]] = {}
    for role, identities in roles.items():
        for identity in identities:
            found.setdefault(identity, set()).add(role)
    return {identity: frozenset(names) for identity, names in found.items()}


# ---- the interceptor ----

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _refusal(method: str, reason: str, identity: str | None) -> TriplaneError:
    who = identity or "a caller without a certificate identity"
    if reason == "METHOD_NOT_ALLOWED":
        message = f"{method} is not in this plane's permission table"
    else:
        message = f"{method} is not allowed for {who}"
    return PermissionDenied(reason, message, metadata={"method": method, "identity": who})


def _refusing_handler(handler: grpc.RpcMethodHandler, error: TriplaneError) -> Any:
    """A handler of the same kind as `handler` that only refuses."""
    status = to_grpc_status(error)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort_with_status(status)
        yield  # pragma: no cover - abort raises

    kinds = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, refuse),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, refuse),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, refuse_stream),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, refuse_stream),
    }
    for kind, (make, behavior) in kinds.items():
        if getattr(handler, kind) is not None:
            return make(
                behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("a method handler of no kind")


class AuthzInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies one plane's permission table to every call (see the module
    docstring). Each method's guarded handler is built once."""

    def __init__(
        self,
        plane: str,
        table: Permissions,
        roles: Mapping[str, Iterable[str]],
        *,
        identify: bool = True,
        cache: PeerIdentityCache = PEER_CACHE,
    ) -> None:
        unknown = {r for allowed in table.values() for r in allowed} - {PUBLIC, *roles}
        if unknown:
            raise ValueError(f"{plane}: permission table names unknown roles {sorted(unknown)}")
        self._plane = plane
        self._table = dict(table)
        self._roles_of = roles_by_identity(roles)
        self._identify = identify
        self._cache = cache
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_open(method):
            return handler  # an unknown method is UNIMPLEMENTED, as before
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(method, handler)
        self._handlers[method] = (handler, guarded)
        return guarded

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        allowed = self._table.get(method)
        if allowed is None:
            log.error("%s: %s is not in the permission table: refused", self._plane, method)
            return _refusing_handler(handler, _refusal(method, "METHOD_NOT_ALLOWED", None))
        if PUBLIC in allowed or not self._identify:
            return handler
        if handler.unary_unary is None:
            # Every method of the mesh is unary; a streaming one must be
            # guarded before it is served.
            log.error("%s: %s is streaming and cannot be guarded: refused", self._plane, method)
            return _refusing_handler(handler, _refusal(method, "METHOD_NOT_ALLOWED", None))
        return grpc.unary_unary_rpc_method_handler(
            self._checked(method, allowed, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _checked(self, method: str, allowed: frozenset[str], behavior: Unary) -> Unary:
        roles_of, cache = self._roles_of, self._cache
        no_roles: frozenset[str] = frozenset()

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            pems = context.auth_context().get("x509_pem_cert")
            identity = cache.identity_of(pems[0]) if pems else None
            if identity is None or not (roles_of.get(identity, no_roles) & allowed):
                error = _refusal(method, "IDENTITY_NOT_ALLOWED", identity)
                await context.abort_with_status(to_grpc_status(error))
            return await behavior(request, context)

        return checked
