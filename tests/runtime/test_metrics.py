"""Metrics wired once in the runtime: RED per RPC on every PlaneServer,
counted with the code the caller saw (a refusal of the permission table, the
error mapper's status, an unhandled error's INTERNAL), served on the plane's
metrics_listen; two servers in one process, on one address or two."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest

from tests.metrics_scrape import Samples, scrape
from triplane.runtime.authz import ANY_CALLER
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.metrics import serve_metrics
from triplane.runtime.net import free_port
from triplane.runtime.server import PlaneServer, ServerSecurity, Service

SERVICE = "triplane.test.v1.EchoService"


def requests(samples: Samples, plane: str, method: str, code: str) -> float:
    labels = frozenset({"plane": plane, "method": f"{SERVICE}/{method}", "code": code}.items())
    return samples.get(("triplane_rpc_requests_total", labels), 0.0)


def durations(samples: Samples, plane: str, method: str) -> float:
    labels = frozenset({"plane": plane, "method": f"{SERVICE}/{method}"}.items())
    return samples.get(("triplane_rpc_duration_seconds_count", labels), 0.0)


async def echo(request: bytes, context: Any) -> bytes:
    if request == b"bad":
        raise InvalidArgument("FIELD_INVALID", "bad request", "text")
    if request == b"boom":
        raise RuntimeError("a bug")
    return request


def echo_service() -> Service:
    handlers = {name: grpc.unary_unary_rpc_method_handler(echo) for name in ("Echo", "Unlisted")}
    return Service(
        SERVICE,
        lambda server: server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, handlers)]
        ),
    )


def plane_server(name: str, metrics_listen: str) -> PlaneServer:
    security = ServerSecurity(
        permissions={f"/{SERVICE}/Echo": ANY_CALLER}, roles={}, tls=None, reflection=False
    )
    return PlaneServer(
        name=name,
        listen="127.0.0.1:0",
        services=[echo_service()],
        security=security,
        metrics_listen=metrics_listen,
    )


async def call(port: int, method: str, payload: bytes) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await channel.unary_unary(f"/{SERVICE}/{method}")(payload, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def test_red_per_rpc_counts_the_code_the_caller_saw_per_plane() -> None:
    first_listen, second_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    first = plane_server("metrics_test_a", first_listen)
    second = plane_server("metrics_test_b", second_listen)
    # A third server naming the first's address shares its endpoint.
    third = plane_server("metrics_test_c", first_listen)
    ports = [await server.start() for server in (first, second, third)]
    try:
        before = await scrape(first_listen)
        assert await call(ports[0], "Echo", b"hi") == grpc.StatusCode.OK
        assert await call(ports[0], "Echo", b"hi") == grpc.StatusCode.OK
        assert await call(ports[0], "Echo", b"bad") == grpc.StatusCode.INVALID_ARGUMENT
        assert await call(ports[0], "Echo", b"boom") == grpc.StatusCode.INTERNAL
        assert await call(ports[0], "Unlisted", b"hi") == grpc.StatusCode.PERMISSION_DENIED
        assert await call(ports[1], "Echo", b"bad") == grpc.StatusCode.INVALID_ARGUMENT
        assert await call(ports[2], "Echo", b"hi") == grpc.StatusCode.OK

        # Every endpoint serves the whole process, each plane under its label.
        for listen in (first_listen, second_listen):
            after = await scrape(listen)

            def moved(plane: str, method: str, code: str, after: Samples = after) -> float:
                return requests(after, plane, method, code) - requests(before, plane, method, code)

            assert moved("metrics_test_a", "Echo", "OK") == 2
            assert moved("metrics_test_a", "Echo", "INVALID_ARGUMENT") == 1
            assert moved("metrics_test_a", "Echo", "INTERNAL") == 1
            assert moved("metrics_test_a", "Unlisted", "PERMISSION_DENIED") == 1
            assert moved("metrics_test_b", "Echo", "INVALID_ARGUMENT") == 1
            assert moved("metrics_test_b", "Echo", "OK") == 0
            assert moved("metrics_test_c", "Echo", "OK") == 1
            assert (
                durations(after, "metrics_test_a", "Echo")
                - durations(before, "metrics_test_a", "Echo")
                == 4
            )
    finally:
        await first.stop()
        # The shared endpoint outlives the first of its two servers.
        await scrape(first_listen)
        await second.stop()
        await third.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(first_listen)


def test_an_empty_address_serves_nothing_and_a_taken_one_says_which_key() -> None:
    assert serve_metrics("") is None
    endpoint = serve_metrics("127.0.0.1:0", "money.metrics_listen")
    assert endpoint is not None and endpoint.port > 0
    try:
        taken = f"127.0.0.1:{endpoint.port}"
        with pytest.raises(OSError, match=r"money\.metrics_listen"):
            serve_metrics(taken, "money.metrics_listen")
        with pytest.raises(ValueError, match="host:port"):
            serve_metrics("localhost", "ai.metrics_listen")
    finally:
        endpoint.close()
