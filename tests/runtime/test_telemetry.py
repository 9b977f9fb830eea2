"""The server's tracing interceptor over a real grpc.aio server: one SERVER span
per call continuing the caller's W3C trace context, RPC attributes and status
codes, errors marked as the semantic conventions say, health checks untraced;
and the metadata a client sends to continue the trace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from triplane.runtime.errors import InvalidArgument
from triplane.runtime.status import ErrorMappingInterceptor, parse_rpc_error
from triplane.runtime.telemetry import TracingInterceptor, current_trace_id, trace_metadata

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


class Server:
    def __init__(self, provider: TracerProvider) -> None:
        self.seen: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.server = grpc.aio.server(
            interceptors=[TracingInterceptor(provider), ErrorMappingInterceptor()]
        )

        async def ok(request: bytes, context: Any) -> bytes:
            self.seen.append((current_trace_id(), trace_metadata()))
            return request

        async def bad(request: bytes, context: Any) -> bytes:
            raise InvalidArgument("AMOUNT_INVALID", "amount must be > 0", "amount")

        async def broken(request: bytes, context: Any) -> bytes:
            raise RuntimeError("boom")

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Svc",
                    {
                        "Ok": grpc.unary_unary_rpc_method_handler(ok),
                        "Bad": grpc.unary_unary_rpc_method_handler(bad),
                        "Broken": grpc.unary_unary_rpc_method_handler(broken),
                    },
                ),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")


@pytest.fixture
async def traced() -> AsyncIterator[tuple[Server, InMemorySpanExporter, grpc.aio.Channel]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = Server(provider)
    await server.server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, exporter, channel
    await server.server.stop(0)


async def test_a_call_continues_the_callers_trace(
    traced: tuple[Server, InMemorySpanExporter, grpc.aio.Channel],
) -> None:
    server, exporter, channel = traced
    for _ in range(3):  # the per-method wrapper is built once and reused
        assert (
            await channel.unary_unary("/test.Svc/Ok")(
                b"x", metadata=(("traceparent", PARENT),), timeout=5
            )
            == b"x"
        )
    spans = exporter.get_finished_spans()
    assert len(spans) == 3
    span = spans[0]
    assert span.name == "test.Svc/Ok" and span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "test.Svc",
        "rpc.method": "Ok",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is StatusCode.UNSET
    # Inside the handler: the trace id for the logs, and metadata for the next hop.
    trace_id, metadata = server.seen[0]
    assert trace_id == TRACE_ID
    (key, value), *_ = metadata
    assert key == "traceparent" and value.split("-")[1] == TRACE_ID
    assert value.split("-")[2] == f"{span.context.span_id:016x}"


async def test_client_errors_and_server_errors_are_told_apart(
    traced: tuple[Server, InMemorySpanExporter, grpc.aio.Channel],
) -> None:
    _, exporter, channel = traced
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await channel.unary_unary("/test.Svc/Bad")(b"x", timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert parse_rpc_error(bad.value) == ("AMOUNT_INVALID", "amount")
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await channel.unary_unary("/test.Svc/Broken")(b"x", timeout=5)
    assert broken.value.code() == grpc.StatusCode.INTERNAL
    client_error, server_error = exporter.get_finished_spans()
    assert client_error.attributes is not None and server_error.attributes is not None
    assert client_error.attributes["rpc.grpc.status_code"] == 3
    assert client_error.status.status_code is StatusCode.UNSET  # the caller's fault
    assert server_error.attributes["rpc.grpc.status_code"] == 13
    assert server_error.status.status_code is StatusCode.ERROR
    # A fresh call without a traceparent starts its own trace.
    assert client_error.parent is None


async def test_health_checks_are_not_traced(
    traced: tuple[Server, InMemorySpanExporter, grpc.aio.Channel],
) -> None:
    _, exporter, channel = traced
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert exporter.get_finished_spans() == ()


async def test_without_an_exporter_ids_still_flow() -> None:
    """Sampled out (no exporter): nothing is recorded, yet the handler has the
    caller's trace id and hands it on."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = Server(provider)
    await server.server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await channel.unary_unary("/test.Svc/Ok")(
                b"x", metadata=(("traceparent", PARENT),), timeout=5
            )
            await channel.unary_unary("/test.Svc/Ok")(b"x", timeout=5)
    finally:
        await server.server.stop(0)
    assert exporter.get_finished_spans() == ()
    (continued, metadata), (fresh, _) = server.seen
    assert continued == TRACE_ID and TRACE_ID in metadata[0][1]
    assert fresh and fresh != TRACE_ID
