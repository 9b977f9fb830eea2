"""nats.url as a server pool: several comma-separated URLs (a JetStream
cluster's nodes) reach the cluster whichever node is down at connect time."""

from __future__ import annotations

import pytest

from triplane.runtime import bus
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port


def test_a_comma_separated_url_is_a_pool_of_servers() -> None:
    assert bus.nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert bus.nats_servers(" nats://a:4222, nats://b:4222 ,") == [
        "nats://a:4222",
        "nats://b:4222",
    ]
    with pytest.raises(ValueError, match="empty"):
        bus.nats_servers(" , ")


@pytest.mark.nats
async def test_a_client_reaches_the_server_that_answers_when_the_first_is_down(
    nats_url: str,
) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    config = load_config(environ={}, overrides={"nats": {"url": f"{down},{nats_url}"}})
    client = await bus.connect(config.nats, "pool-test", fail_fast=True)
    try:
        assert client.is_connected
        assert client.connected_url is not None
        assert client.connected_url.geturl() == nats_url
    finally:
        await client.close()
