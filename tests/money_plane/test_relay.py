"""The outbox relay against a private nats-server: NATS being down delays
events and loses none; when it is back every event arrives exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from money_helpers import (
    DEBITS_LIMITED,
    NO_CONSTRAINT,
    DbProbe,
    Kit,
    ledger_config,
    new_signer,
    stream_count,
    stream_messages,
    unique_tenant,
)

from money_plane.app import MoneyPlane
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import with_overrides
from triplane_tools.natsd import EmbeddedNats

pytestmark = [pytest.mark.slow, pytest.mark.nats]


# The ledger's own events in the outbox (the tenant registration goes to its own stream).
LEDGER_EVENTS = "substr(subject, 1, 15) = 'triplane.money.'"


async def _until(
    predicate_description: str, check: Callable[[], Any], timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {predicate_description}")


async def test_nats_down_delays_events_and_loses_none(tmp_path: Path) -> None:
    nats_dir = tmp_path / "nats"
    server = EmbeddedNats(nats_dir)
    url = server.start()
    signer = new_signer()
    config = with_overrides(
        ledger_config(tmp_path / "state", signer),
        {
            "nats": {"url": url, "publish_timeout_s": 0.5, "connect_timeout_s": 0.5},
            "money": {
                "outbox": {"relay_retry": {"initial_interval_s": 0.05, "maximum_interval_s": 0.5}}
            },
        },
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    clock = ManualClock(int(time.time() * 1_000_000))
    plane = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
    await plane.start(sweepers=False)
    assert plane.ledger is not None
    tenant = unique_tenant("relay")
    subject = f"triplane.money.{tenant}.>"
    probe = DbProbe("sqlite", tmp_path / "state" / "money.db")
    kit = Kit(plane.ledger, clock, signer, "sqlite", tmp_path / "state" / "money.db", tenant)
    try:
        await plane.ledger.create_tenant(tenant, "relay")
        await kit.open(("bank", "USD", NO_CONSTRAINT, 0), ("cust", "USD", DEBITS_LIMITED, 0))
        for i in range(5):
            await kit.ok(kit.move(f"before-{i}", "bank", "cust", 10 + i))

        def unsent() -> int:
            return int(probe.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL"))

        await _until("the first events to be published", lambda: unsent() == 0)
        assert await stream_count(url, subject) == 7

        relay = plane.relay
        assert relay is not None
        server.stop()
        for i in range(20):
            await kit.ok(kit.move(f"during-{i}", "bank", "cust", 100 + i))
        # An authorization too: hold events travel the same way.
        await kit.ok(kit.authorize("during-hold", "cust", "bank", 5))
        # The relay keeps trying and JetStream, being down, acknowledges
        # nothing. Each attempt reads the outbox afresh, so the second failure
        # from now was an attempt at every event written above.
        failures = relay.publish_failures
        await _until("the relay to fail twice more", lambda: relay.publish_failures >= failures + 2)
        # And the tenant's registration, on the tenant registry's stream.
        assert relay.published == 7 + 1
        assert unsent() == 21, "events were marked sent while NATS was down"

        server = EmbeddedNats(nats_dir, port=server.port)
        server.start()
        await _until("the relay to catch up", lambda: unsent() == 0)
        total = int(probe.scalar(f"SELECT COUNT(*) FROM outbox WHERE {LEDGER_EVENTS}"))
        assert total == 2 + 5 + 20 + 1
        assert relay.published == total + 1  # the registration
        await _until(
            "JetStream to hold every event", lambda: _at_least(url, subject, total), timeout_s=20
        )
        messages = await stream_messages(url, subject, total)
        ids = [msg_id for msg_id, _ in messages]
        assert len(ids) == len(set(ids)) == total
        assert dict(messages) == dict(
            probe.rows(f"SELECT event_id, subject FROM outbox WHERE {LEDGER_EVENTS}")
        )
    finally:
        probe.close()
        kit.probe.close()
        await plane.stop()
        server.stop()


async def _at_least(url: str, subject: str, count: int) -> bool:
    return await stream_count(url, subject) >= count


async def test_relay_restart_duplicates_nothing(tmp_path: Path, nats_url: str) -> None:
    """Two planes in turn on the same store: events the first relay published
    but the second sees again (unsent marks lost) are not stored twice."""
    signer = new_signer()
    (tmp_path / "state").mkdir(exist_ok=True)
    config = with_overrides(
        ledger_config(tmp_path / "state", signer),
        {
            "nats": {"url": nats_url},
        },
    )
    clock = ManualClock(int(time.time() * 1_000_000))
    tenant = unique_tenant("restart")
    subject = f"triplane.money.{tenant}.>"
    db = tmp_path / "state" / "money.db"
    probe = DbProbe("sqlite", db)
    try:
        plane = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
        await plane.start(sweepers=False)
        assert plane.ledger is not None
        kit = Kit(plane.ledger, clock, signer, "sqlite", db, tenant)
        await plane.ledger.create_tenant(tenant, "restart")
        await kit.open(("bank", "USD", NO_CONSTRAINT, 0), ("cust", "USD", NO_CONSTRAINT, 0))
        for i in range(10):
            await kit.ok(kit.move(f"r-{i}", "bank", "cust", 1 + i))
        await _until(
            "publication",
            lambda: probe.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL") == 0,
        )
        kit.probe.close()
        await plane.stop()
        # As if the relay had died between JetStream's ack and marking the rows.
        probe.rows("UPDATE outbox SET sent_at_us = NULL")
        plane = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
        await plane.start(sweepers=False)
        try:
            await _until(
                "re-publication",
                lambda: probe.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL") == 0,
            )
        finally:
            await plane.stop()
        total = int(probe.scalar(f"SELECT COUNT(*) FROM outbox WHERE {LEDGER_EVENTS}"))
        assert total == 12
        messages = await stream_messages(nats_url, subject, total)
        assert len(messages) == total
        assert len({msg_id for msg_id, _ in messages}) == total
    finally:
        probe.close()
