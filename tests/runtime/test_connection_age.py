"""runtime.grpc.max_connection_age_s: a plane's server asks clients to
reconnect now and then, so a client whose target is a headless Service's
dns:/// name re-resolves it and reaches replicas that came up since (gRPC's
round_robin learns addresses only on re-resolution).

A real grpc.aio server with the options ConnectionAge gives it: the peer
(the client's ephemeral port) changes across calls on one channel when an age
is set, and stays one connection when it is not."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from triplane.runtime.config import ConfigError, load_config
from triplane.runtime.server import (
    REUSE_PORT_CONNECTION_AGE_MS,
    REUSE_PORT_CONNECTION_GRACE_MS,
    ConnectionAge,
)

METHOD = "/triplane.test.Peer/Who"
# Calls, each after a pause: with a 0.2 s age they span several ages.
CALLS = 25
PAUSE_S = 0.05


def _peer_handler() -> grpc.GenericRpcHandler:
    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peer: str = context.peer()
        return peer.encode()

    return grpc.method_handlers_generic_handler(
        "triplane.test.Peer",
        {"Who": grpc.unary_unary_rpc_method_handler(who)},
    )


async def _peers(age: ConnectionAge) -> set[str]:
    server = grpc.aio.server(options=age.options(reuse_port=False))
    server.add_generic_rpc_handlers([_peer_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)
            peers = set()
            for _ in range(CALLS):
                # wait_for_ready: a call that meets the GOAWAY waits for the
                # new connection instead of failing.
                peers.add((await call(b"", timeout=5.0, wait_for_ready=True)).decode())
                await asyncio.sleep(PAUSE_S)
            return peers
    finally:
        await server.stop(None)


async def test_an_aged_connection_is_replaced_and_the_client_reconnects() -> None:
    peers = await _peers(ConnectionAge(max_age_s=0.2, grace_s=0.1))
    assert len(peers) > 1, peers


async def test_without_an_age_one_connection_serves_every_call() -> None:
    peers = await _peers(ConnectionAge())
    assert len(peers) == 1, peers


def test_options_follow_the_config_and_reuse_port_caps_the_age() -> None:
    config = load_config(
        environ={},
        overrides={
            "runtime": {"grpc": {"max_connection_age_s": 300, "max_connection_age_grace_s": 30}}
        },
    )
    age = ConnectionAge.from_config(config)
    assert dict(age.options(reuse_port=False)) == {
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 30_000,
    }
    # Several processes on one port recycle at least every 20 s.
    assert dict(age.options(reuse_port=True))["grpc.max_connection_age_ms"] == (
        REUSE_PORT_CONNECTION_AGE_MS
    )
    assert dict(ConnectionAge().options(reuse_port=True)) == {
        "grpc.max_connection_age_ms": REUSE_PORT_CONNECTION_AGE_MS,
        "grpc.max_connection_age_grace_ms": REUSE_PORT_CONNECTION_GRACE_MS,
    }
    assert ConnectionAge().options(reuse_port=False) == []


def test_a_negative_age_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.grpc\.max_connection_age_s"):
        load_config(environ={}, overrides={"runtime": {"grpc": {"max_connection_age_s": -1}}})
