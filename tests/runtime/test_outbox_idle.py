"""An idle outbox relay backs off (money/gateway.outbox.relay_idle_max_ms):
each read of an empty outbox waits twice as long as the one before, from
relay_idle_poll_ms up to the maximum, and a kick or a batch found starts
again from relay_idle_poll_ms. A fleet of idle replicas then reads its
outboxes about once per maximum instead of tens of times a second.

The schedule is checked on the waits the relay really asks for (recorded by
the settings it is given), against a real JetStream."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

from triplane.runtime import bus
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ConfigError, load_config
from triplane.runtime.net import free_port
from triplane.runtime.outbox import OutboxRelay, RelaySettings

from .test_retry import START_US, MemoryOutbox, assert_in_jetstream, event, until


def settings(poll_ms: float, max_ms: float) -> RelaySettings:
    config = load_config(
        environ={},
        overrides={
            "money": {"outbox": {"relay_idle_poll_ms": poll_ms, "relay_idle_max_ms": max_ms}}
        },
    )
    return RelaySettings.from_config(config.money.outbox, ["TRIPLANE_MONEY"])


def test_the_idle_wait_doubles_up_to_the_maximum_and_restarts_after_events() -> None:
    backoff = settings(20, 500)
    waits = [backoff.next_idle_wait(0.0)]
    for _ in range(7):
        waits.append(backoff.next_idle_wait(waits[-1]))
    assert waits == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5])
    assert backoff.next_idle_wait(0.0) == pytest.approx(0.02)
    # 0: no backoff, every relay_idle_poll_ms as before.
    flat = settings(20, 0)
    assert flat.next_idle_wait(0.0) == flat.next_idle_wait(0.02) == pytest.approx(0.02)


def test_config_refuses_a_negative_maximum_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.outbox\.relay_idle_max_ms"):
        load_config(environ={}, overrides={"gateway": {"outbox": {"relay_idle_max_ms": -1}}})


@dataclass(frozen=True)
class RecordedSettings(RelaySettings):
    """RelaySettings that note every idle wait the relay asks them for."""

    asked: list[float] = field(default_factory=list, compare=False)

    def next_idle_wait(self, waited_s: float) -> float:
        wait_s = super().next_idle_wait(waited_s)
        self.asked.append(wait_s)
        return wait_s


@pytest.mark.nats
async def test_a_relay_backs_off_while_idle_and_a_kick_publishes_at_once(nats_url: str) -> None:
    base = settings(5, 40)
    recorded = RecordedSettings(**{**base.__dict__, "asked": []})
    config = load_config(environ={}, overrides={"nats": {"url": nats_url}})
    source = MemoryOutbox()
    relay = OutboxRelay(source, config.nats, recorded, ManualClock(START_US), "idle-test")
    client = await bus.connect(config.nats, "idle-test")
    task = asyncio.create_task(relay.run_with(client.jetstream()))
    try:
        # Idle: 5, 10, 20, 40, 40 ms ...
        await until(lambda: len(recorded.asked) >= 6, "six idle waits")
        assert recorded.asked[:6] == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.04, 0.04])
        # An event and a kick (a commit in this process): published, and the
        # next idle wait starts again from relay_idle_poll_ms.
        tenant = f"idle{free_port()}"
        source.events = [event(tenant, 0)]
        seen = len(recorded.asked)
        relay.kick()
        await until(lambda: relay.published == 1, "the kicked event published")
        await until(lambda: len(recorded.asked) > seen, "an idle wait after the event")
        assert recorded.asked[seen] == pytest.approx(0.005)
        await assert_in_jetstream(nats_url, source.events)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
