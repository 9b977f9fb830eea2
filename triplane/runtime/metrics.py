"""Prometheus metrics, wired once for every plane: one registry per process
(prometheus_client's default), one way to serve it (`serve_metrics`, which
PlaneServer calls for `<plane>.metrics_listen`) and RED per RPC
(`RedInterceptor`, which PlaneServer installs on every server).

Metrics are defined once per process, at module level, so two planes started
in one process (the tests do) never register a name twice; what tells their
figures apart is a label (`plane` here), never a second registration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)

from triplane.runtime.interceptors import Unary, UnaryWrappingInterceptor
from triplane.runtime.net import host_port

log = logging.getLogger("triplane.metrics")

# The registry every plane's metrics live in and every endpoint serves.
PROCESS_REGISTRY: CollectorRegistry = REGISTRY
# Set before prometheus_client is imported (money_plane/metrics_share.py):
# several processes serving one port keep their values in files there, and
# the endpoint adds every process's up.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _served_registry() -> CollectorRegistry:
    if not os.environ.get(MULTIPROCESS_DIR_ENV):
        return PROCESS_REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


# From a quarter of a millisecond (a policy decision, a cached score) to ten
# seconds (a group commit behind a slow disk, a long deadline).
RPC_DURATION_BUCKETS_S = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

RPC_REQUESTS = Counter(
    "triplane_rpc_requests",
    "Unary RPCs answered, by the status code the caller saw",
    ["plane", "method", "code"],
    registry=PROCESS_REGISTRY,
)
RPC_DURATION = Histogram(
    "triplane_rpc_duration_seconds",
    "Time from a call reaching the server's interceptors to its answer",
    ["plane", "method"],
    buckets=RPC_DURATION_BUCKETS_S,
    registry=PROCESS_REGISTRY,
)

# Probes and tooling, not traffic (as for traces).
_UNMEASURED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code the call ends with so far (OK when none was set)."""
    code = context.code() or grpc.StatusCode.OK
    if isinstance(code, int):  # grpc.aio reports a bare number
        return _CODE_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    assert isinstance(code, grpc.StatusCode)
    return code


def _measured(plane: str, method: str, behavior: Unary) -> Unary:
    name = method.lstrip("/")
    duration = RPC_DURATION.labels(plane, name)
    # The labelled children, looked up once per code rather than per call.
    requests: dict[grpc.StatusCode, Any] = {}

    def count(code: grpc.StatusCode) -> None:
        child = requests.get(code)
        if child is None:
            child = requests[code] = RPC_REQUESTS.labels(plane, name, code.name)
        child.inc()

    async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        # An exception that escapes the interceptors inside without a status
        # (none should: the error mapper sets one) reaches the caller as
        # UNKNOWN; a call cancelled (the caller left, its deadline passed)
        # ends CANCELLED.
        code = grpc.StatusCode.UNKNOWN
        try:
            result = await behavior(request, context)
        except grpc.aio.AbortError:
            code = status_code_of(context)
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        else:
            code = status_code_of(context)
            return result
        finally:
            duration.observe(time.perf_counter() - started)
            count(code)

    return measured


class RedInterceptor(UnaryWrappingInterceptor):
    """Rate, errors and duration of every unary RPC a plane serves, labelled
    by plane, method and the canonical status code. PlaneServer installs it
    outermost, so the code is the one the caller saw: after the permission
    table and the error mapper."""

    def __init__(self, plane: str) -> None:
        super().__init__()
        self._plane = plane

    def wraps(self, method: str) -> bool:
        return not method.startswith(_UNMEASURED)

    def wrap(self, method: str, behavior: Unary) -> Unary:
        return _measured(self._plane, method, behavior)


# ---- serving ----


@dataclass
class _Endpoint:
    server: WSGIServer
    thread: threading.Thread
    users: int = 0


_ENDPOINTS: dict[str, _Endpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


def _host_port(listen: str, key: str) -> tuple[str, int]:
    try:
        host, port = host_port(listen)
    except ValueError:
        raise ValueError(f"{key}: {listen!r} is not host:port") from None
    return host or "0.0.0.0", port


@dataclass
class MetricsEndpoint:
    """The process's registry served at http://<listen>/metrics (in a thread
    of prometheus_client's), until `close()`. Planes of one process that name
    the same address share one endpoint: it closes with the last of them."""

    listen: str
    port: int
    _closed: bool = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _ENDPOINTS_LOCK:
            endpoint = _ENDPOINTS[self.listen]
            endpoint.users -= 1
            if endpoint.users:
                return
            del _ENDPOINTS[self.listen]
        endpoint.server.shutdown()
        endpoint.server.server_close()
        endpoint.thread.join()


def serve_metrics(listen: str, key: str = "metrics_listen") -> MetricsEndpoint | None:
    """Serves the process's metrics on `listen` (host:port); None when it is
    empty (metrics are still collected, only not served). `key` names the
    setting in errors."""
    if not listen:
        return None
    with _ENDPOINTS_LOCK:
        endpoint = _ENDPOINTS.get(listen)
        if endpoint is None:
            host, port = _host_port(listen, key)
            try:
                server, thread = start_http_server(port, addr=host, registry=_served_registry())
            except OSError as error:
                raise OSError(f"cannot serve metrics on {listen} ({key}): {error}") from error
            endpoint = _ENDPOINTS[listen] = _Endpoint(server, thread)
            log.info("metrics served", extra={"metrics_listen": listen})
        endpoint.users += 1
        return MetricsEndpoint(listen, endpoint.server.server_port)
