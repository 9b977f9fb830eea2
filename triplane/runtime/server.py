"""Server bootstrap shared by every plane: grpc.aio with standard health and
reflection, mutual TLS and the plane's permission table, OpenTelemetry
instrumentation, error mapping, Prometheus metrics (RED per RPC, served on
the plane's metrics_listen), graceful SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from triplane.runtime.authz import AuthzInterceptor, PeerIdentityCache, Permissions
from triplane.runtime.config import Config
from triplane.runtime.lifetime import exit_with_supervisor
from triplane.runtime.metrics import MetricsEndpoint, RedInterceptor, serve_metrics
from triplane.runtime.status import ErrorMappingInterceptor
from triplane.runtime.telemetry import TracingInterceptor, setup_tracing
from triplane.runtime.tls import ServerCertificates, TlsFiles, TlsSetupError, files_for

log = logging.getLogger("triplane.server")


@dataclass(frozen=True)
class Service:
    """One gRPC service to serve: its full name and how to register it."""

    full_name: str
    register: Callable[[grpc.aio.Server], None]


Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ServerSecurity:
    """Who may reach a server and how: its TLS files (None: plaintext, with
    `runtime.tls: off`), the plane's permission table (method -> roles,
    triplane.runtime.authz) and which identities play each role."""

    permissions: Permissions
    roles: Mapping[str, Sequence[str]]
    tls: TlsFiles | None
    # False: a client connects without a certificate (the gateway's public
    # port, where partners use keys). gRPC's Python server then does not ask
    # for one at all, so no caller is identified there: `mtls_listen` adds a
    # port of the same server that requires one (the gateway's admin port).
    require_client_cert: bool = True
    # host:port of a second port serving the same services with client
    # certificates required ("": none). Only with require_client_cert False.
    mtls_listen: str = ""
    reflection: bool = True
    # host:port of a plaintext port serving only grpc.health.v1 ("": none).
    health_listen: str = ""
    peer_cache_entries: int = 4096

    @classmethod
    def from_config(
        cls,
        config: Config,
        identity: str,
        permissions: Permissions,
        *,
        require_client_cert: bool = True,
        reflection: bool | None = None,
        mtls_listen: str = "",
    ) -> ServerSecurity:
        """The security of the plane whose certificate is `identity`'s."""
        tls = config.runtime.tls
        return cls(
            permissions=permissions,
            roles=tls.roles,
            tls=files_for(config, identity),
            require_client_cert=require_client_cert,
            mtls_listen=mtls_listen,
            reflection=config.runtime.reflection if reflection is None else reflection,
            health_listen=config.runtime.health_listen,
            peer_cache_entries=tls.peer_cache_entries,
        )


def run(main: Callable[[], Coroutine[Any, Any, None]], event_loop: str = "uvloop") -> None:
    """Runs a serving process's main coroutine on the configured event loop
    (runtime.event_loop): uvloop (about 10% less CPU per gRPC call than
    asyncio's own loop, measured here) or asyncio.

    Started by the dev stack (or by a plane's own process, as the money plane
    starts its workers), the process dies with whatever started it, so a
    supervisor killed with SIGKILL leaves no plane holding its port.

    A plane whose TLS files are missing exits with the message saying how to
    get them, not a traceback."""
    exit_with_supervisor()
    try:
        if event_loop == "uvloop":
            import uvloop

            uvloop.run(main())
        else:
            asyncio.run(main())
    except TlsSetupError as error:
        log.critical("%s", error)
        raise SystemExit(f"refusing to start: {error}") from None


REUSE_PORT_CONNECTION_AGE_MS = 20_000
REUSE_PORT_CONNECTION_GRACE_MS = 10_000


@dataclass(frozen=True)
class ConnectionAge:
    """How long a client connection may live before the server asks it to
    close (GOAWAY), and the grace its calls in flight get. A client that
    reconnects re-resolves its target, which is how round_robin over a
    headless Service's dns:/// name learns of replicas added since; max_age_s
    0 leaves connections open until a side closes them."""

    max_age_s: float = 0.0
    grace_s: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> ConnectionAge:
        grpc_config = config.runtime.grpc
        return cls(grpc_config.max_connection_age_s, grpc_config.max_connection_age_grace_s)

    def options(self, reuse_port: bool) -> list[tuple[str, int]]:
        """gRPC server options. Several processes on one port (reuse_port):
        the kernel spreads connections, not calls, so connections are
        recycled at least every REUSE_PORT_CONNECTION_AGE_MS for the load to
        even out."""
        age_ms = round(self.max_age_s * 1000)
        grace_ms = round(self.grace_s * 1000)
        if reuse_port:
            age_ms = min(age_ms or REUSE_PORT_CONNECTION_AGE_MS, REUSE_PORT_CONNECTION_AGE_MS)
            grace_ms = grace_ms or REUSE_PORT_CONNECTION_GRACE_MS
        if not age_ms:
            return []
        return [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", grace_ms),
        ]


def tune_gc(gen0_threshold: int) -> None:
    gc.collect()
    gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)


@dataclass
class PlaneServer:
    """A plane's gRPC server. `start()` returns the bound port."""

    name: str
    listen: str
    services: Sequence[Service]
    security: ServerSecurity
    shutdown_grace_s: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    otel_exporter: str = "none"
    # Several processes may serve one port (SO_REUSEPORT): Python's gRPC
    # server uses one core per process, so this is how a plane uses a node.
    reuse_port: bool = False
    # runtime.grpc.max_connection_age_s / _grace_s (ConnectionAge.from_config).
    connection_age: ConnectionAge = field(default_factory=ConnectionAge)
    # Interceptors of the plane's own (the gateway's credentials), inside the
    # permission table and the error mapping: they see the peer identity
    # (authz.peer_identity) and may raise TriplaneError.
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    on_stop: list[Hook] = field(default_factory=list)
    # host:port of the process's Prometheus endpoint (`<plane>.metrics_listen`;
    # "": not served, the metrics are still collected).
    metrics_listen: str = ""
    port: int = 0
    health_port: int = 0
    # The port that requires client certificates (ServerSecurity.mtls_listen).
    mtls_port: int = 0
    certificates: ServerCertificates | None = None
    _server: grpc.aio.Server | None = None
    _health_server: grpc.aio.Server | None = None
    _health: HealthServicer | None = None
    _metrics: MetricsEndpoint | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            *self.connection_age.options(self.reuse_port),
        ]

    async def start(self) -> int:
        security = self.security
        if security.tls is None:
            log.warning(
                "%s: runtime.tls is off: plaintext, and no caller can be identified, so the "
                "permission table lets every caller through as every role. For local debugging "
                "only",
                self.name,
            )
        else:
            # Before anything binds: no certificate, no start (the message says how).
            self.certificates = ServerCertificates(security.tls, self.name)
        provider = setup_tracing(self.name, self.otel_exporter)
        authz = AuthzInterceptor(
            self.name,
            security.permissions,
            security.roles,
            identify=security.tls is not None,
            cache=PeerIdentityCache(security.peer_cache_entries),
        )
        server = grpc.aio.server(
            interceptors=[
                # Outermost, so it counts the code the caller sees: refusals
                # of the permission table and statuses of the error mapper.
                RedInterceptor(self.name),
                TracingInterceptor(provider),
                authz,
                ErrorMappingInterceptor(),
                *self.interceptors,
            ],
            options=self._options(),
        )
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        names = [s.full_name for s in self.services]
        for service in self.services:
            service.register(server)
        if security.reflection:
            reflection.enable_server_reflection(
                [
                    *names,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                server,
            )
        if self.certificates is not None:
            credentials = self.certificates.credentials(security.require_client_cert)
            self.port = server.add_secure_port(self.listen, credentials)
        else:
            self.port = server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {self.listen}")
        if security.mtls_listen and self.certificates is not None:
            required = self.certificates.credentials(require_client_cert=True)
            self.mtls_port = server.add_secure_port(security.mtls_listen, required)
            if self.mtls_port == 0:
                raise OSError(f"{self.name}: cannot listen on {security.mtls_listen}")
        self._metrics = serve_metrics(self.metrics_listen, f"{self.name}: metrics_listen")
        await server.start()
        self._server, self._health = server, health
        if security.health_listen:
            await self._start_health_port(health, security.health_listen)
        for name in ["", *names]:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "%s listening",
            self.name,
            extra={"listen": self.listen, "port": self.port, "tls": security.tls is not None},
        )
        return self.port

    async def _start_health_port(self, health: HealthServicer, listen: str) -> None:
        """Kubernetes' gRPC probes cannot present a client certificate, so
        they get a plaintext port with grpc.health.v1 alone: it tells whether
        the plane serves, nothing else."""
        server = grpc.aio.server(options=self._options())
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.health_port = server.add_insecure_port(listen)
        if self.health_port == 0:
            raise OSError(f"{self.name}: cannot listen on {listen} (runtime.health_listen)")
        await server.start()
        self._health_server = server

    async def stop(self) -> None:
        """Graceful: NOT_SERVING first (so probes drain traffic), then stop."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        assert self._health is not None
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.shutdown_grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
        for hook in self.on_stop:
            await hook()
        if self._metrics is not None:
            # Its HTTP thread notices the shutdown within half a second: off the loop.
            await asyncio.to_thread(self._metrics.close)
        log.info("%s stopped", self.name)

    async def serve_until_signalled(self, gc_gen0_threshold: int = 0) -> None:
        """Runs until SIGTERM or SIGINT, then shuts down gracefully.

        What the process built at start (config, compiled rules, models,
        channels) lives for good: it is frozen out of the collector's
        generations, and young collections run every `gc_gen0_threshold`
        allocations (0: CPython's default), so collector pauses stay short."""
        tune_gc(gc_gen0_threshold)
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        if self._server is None:
            await self.start()
        await stop_requested.wait()
        log.info("%s: signal received, draining", self.name)
        await self.stop()
