"""The spine's streams are bounded: every stream gets the size, age, event size,
per-subject count and discard policy of nats.streams.<plane>, on creation and
on a stream that already exists with other settings; a full stream refuses new
events (nothing it holds is dropped); a bound the server cannot reserve fails
with the config key named.

Against a real nats-server of its own (the shared one's streams belong to the
other suites)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from triplane.runtime import bus
from triplane.runtime.config import Config, ConfigError, load_config
from triplane_tools.natsd import EmbeddedNats


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedNats(tmp_path_factory.mktemp("bounds-nats"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
async def client(own_nats: str) -> AsyncIterator[NatsClient]:
    connection = await nats.connect(own_nats)
    js = connection.jetstream()
    for name in bus.STREAMS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    yield connection
    await connection.close()


def config_with(streams: dict[str, Any] | None = None) -> Config:
    return load_config(environ={}, overrides={"nats": {"streams": streams or {}}})


async def test_every_stream_gets_its_configured_bounds(client: NatsClient) -> None:
    config = config_with()
    js = client.jetstream()
    await bus.ensure_streams(js, config.nats)
    for name in bus.STREAMS:
        limits = getattr(config.nats.streams, bus.limits_key(name))
        got = (await js.stream_info(name)).config
        assert got.max_bytes == limits.max_bytes > 0
        assert got.max_age == limits.max_age_s
        assert got.max_msg_size == limits.max_msg_bytes > 0
        assert got.max_msgs_per_subject == limits.max_msgs_per_subject
        assert got.discard == DiscardPolicy.NEW
        assert got.duplicate_window == config.nats.dedupe_window_s
    # The shipped defaults: one tenant's events of one kind are bounded on
    # the gateway's stream; the ledger's are all kept (within size and age).
    assert config.nats.streams.gateway.max_msgs_per_subject > 0
    assert config.nats.streams.money.max_msgs_per_subject == -1
    # Events age out; the tenant registry keeps one message per tenant for good.
    assert all(
        getattr(config.nats.streams, bus.limits_key(name)).max_age_s > 0
        for name in bus.STREAMS
        if name != "TRIPLANE_TENANTS"
    )
    assert config.nats.streams.tenants.max_age_s == 0
    assert config.nats.streams.tenants.max_msgs_per_subject == 1


async def test_an_existing_unbounded_stream_is_updated_to_the_bounds(client: NatsClient) -> None:
    js = client.jetstream()
    # As an earlier release made it: no size bound, discard old.
    await js.add_stream(
        StreamConfig(
            name="TRIPLANE_GATEWAY",
            subjects=bus.STREAMS["TRIPLANE_GATEWAY"],
            storage=StorageType.FILE,
            max_age=60.0,
        )
    )
    await js.publish("triplane.gateway.acme.behaviour.login", b"kept")
    config = config_with({"gateway": {"max_bytes": 5_000_000, "max_msgs_per_subject": 7}})
    await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY"])
    info = await js.stream_info("TRIPLANE_GATEWAY")
    assert info.config.max_bytes == 5_000_000
    assert info.config.max_msgs_per_subject == 7
    assert info.config.max_age == config.nats.streams.gateway.max_age_s
    assert info.config.discard == DiscardPolicy.NEW
    assert info.state.messages == 1  # updating kept what it held
    # And ensuring again with the same bounds changes nothing.
    await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY"])
    assert (await js.stream_info("TRIPLANE_GATEWAY")).state.messages == 1


async def test_a_full_stream_refuses_new_events_and_drops_none(client: NatsClient) -> None:
    js = client.jetstream()
    config = config_with({"money": {"max_bytes": 4096, "max_msg_bytes": 1024}})
    await bus.ensure_streams(js, config.nats, ["TRIPLANE_MONEY"])
    accepted = 0
    refused = None
    for index in range(100):
        try:
            await js.publish(f"triplane.money.acme.entry.n{index}", b"x" * 200)
            accepted += 1
        except nats.js.errors.APIError as error:
            refused = error
            break
    assert refused is not None and 0 < accepted < 100
    state = (await js.stream_info("TRIPLANE_MONEY")).state
    assert state.messages == accepted and state.first_seq == 1  # the oldest are all there
    # An event over max_msg_bytes is refused whole.
    with pytest.raises(nats.js.errors.APIError):
        await js.publish("triplane.money.globex.entry.posted", b"y" * 2048)


async def test_one_subject_rolls_its_own_history_only(client: NatsClient) -> None:
    js = client.jetstream()
    config = config_with({"gateway": {"max_msgs_per_subject": 3}})
    await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY"])
    await js.publish("triplane.gateway.quiet.behaviour.login", b"quiet")
    for index in range(10):
        await js.publish("triplane.gateway.noisy.behaviour.login", f"{index}".encode())
    state = (await js.stream_info("TRIPLANE_GATEWAY", subjects_filter=">")).state
    assert state.subjects == {
        "triplane.gateway.quiet.behaviour.login": 1,
        "triplane.gateway.noisy.behaviour.login": 3,
    }
    last = await js.get_last_msg("TRIPLANE_GATEWAY", "triplane.gateway.noisy.behaviour.login")
    assert last.data == b"9"


async def test_a_bound_the_server_cannot_reserve_names_the_key(client: NatsClient) -> None:
    config = config_with({"ai": {"max_bytes": 1 << 50}})  # a pebibyte
    with pytest.raises(bus.StreamLimitsError, match=r"nats\.streams\.ai\.max_bytes"):
        await bus.ensure_streams(client.jetstream(), config.nats, ["TRIPLANE_AI"])


@pytest.mark.parametrize(
    ("streams", "key"),
    [
        ({"money": {"max_bytes": 0}}, r"nats\.streams\.money"),
        ({"policy": {"max_age_s": -1}}, r"nats\.streams\.policy\.max_age_s"),
        ({"ai": {"max_msg_bytes": 0}}, r"nats\.streams\.ai"),
        ({"gateway": {"max_msgs_per_subject": 0}}, r"nats\.streams\.gateway\.max_msgs_per_subject"),
        ({"gateway": {"discard": "sometimes"}}, r"nats\.streams\.gateway\.discard"),
    ],
)
def test_unbounded_or_unknown_settings_are_refused_at_load(
    streams: dict[str, Any], key: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=key):
        config_with(streams)
