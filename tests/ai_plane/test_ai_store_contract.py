"""One contract, every backend: in-process, Redis (real, at :6379) and
Aerospike (when AEROSPIKE_HOSTS names a cluster)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from ai_plane.features import EntityRef, Increment, keys_for, stored_features, updates_for
from ai_plane.store.base import FeatureStore, read_stored_features
from ai_plane.store.memory import InProcessStore
from triplane.runtime.clock import ManualClock, SystemClock
from triplane_sim import synth

BACKENDS = ["in_process", "redis", "aerospike"]
FAR_FUTURE_US = 4_000_000_000_000_000


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[FeatureStore]:
    backend = request.param
    if backend == "in_process":
        yield InProcessStore(max_keys=100_000, dedupe_ttl_s=3600, clock=SystemClock())
        return
    if backend == "redis":
        redis_url = request.getfixturevalue("redis_url")
        from ai_plane.store.redis_store import RedisStore

        # A fresh prefix per test: tests never see each other's keys.
        redis_store = RedisStore(
            redis_url, dedupe_ttl_s=3600, key_prefix=f"t{uuid.uuid4().hex[:8]}:"
        )
        yield redis_store
        await redis_store.close()
        return
    hosts = os.environ.get("AEROSPIKE_HOSTS", "")
    if not hosts:
        # Opt-in, unlike PostgreSQL and Redis: CI does not start Aerospike, and
        # under CI=true this suite still skips (tests/conftest.py's rule).
        pytest.skip(
            "AEROSPIKE_HOSTS not set: the Aerospike backend is opt-in and its contract "
            "suite runs only against a cluster named there (also under CI=true)"
        )
    from ai_plane.store.aerospike_store import AerospikeStore

    aerospike_store = AerospikeStore(hosts, "test", f"t{uuid.uuid4().hex[:8]}", 3600, 50.0)
    yield aerospike_store
    await aerospike_store.close()


def _key() -> str:
    return f"k:{uuid.uuid4().hex}"


async def test_missing_keys_read_as_empty_in_order(store: FeatureStore) -> None:
    a, b = _key(), _key()
    await store.apply("", [Increment(b, "txn_count", 2.0, FAR_FUTURE_US)])
    assert await store.read([a, b, a]) == [{}, {"txn_count": 2.0}, {}]


async def test_increments_add_up_per_field(store: FeatureStore) -> None:
    key = _key()
    await store.apply("", [Increment(key, "txn_count", 1.0, FAR_FUTURE_US)])
    await store.apply(
        "",
        [
            Increment(key, "txn_count", 1.0, FAR_FUTURE_US),
            Increment(key, "txn_amount", 250.5, FAR_FUTURE_US),
        ],
    )
    [record] = await store.read([key])
    assert record == {"txn_count": 2.0, "txn_amount": 250.5}


async def test_an_event_is_applied_once(store: FeatureStore) -> None:
    key, event_id = _key(), f"evt-{uuid.uuid4().hex}"
    increments = [Increment(key, "txn_count", 1.0, FAR_FUTURE_US)]
    assert await store.apply(event_id, increments) is True
    assert await store.apply(event_id, increments) is False  # redelivery
    assert await store.apply(f"{event_id}-other", increments) is True
    [record] = await store.read([key])
    assert record == {"txn_count": 2.0}


async def test_never_expiring_records_stay(store: FeatureStore) -> None:
    key = _key()
    await store.apply("", [Increment(key, "spend", 10.0, 0)])
    assert await store.read([key]) == [{"spend": 10.0}]


async def test_expired_records_are_not_read(store: FeatureStore) -> None:
    key = _key()
    await store.apply("", [Increment(key, "txn_count", 1.0, 1_000_000)])  # long past
    assert await store.read([key]) == [{}]


def test_in_process_records_expire_on_the_clock_and_restart_afresh() -> None:
    clock = ManualClock(1_000)
    store = InProcessStore(max_keys=100, dedupe_ttl_s=10, clock=clock)
    store.apply_sync("", [Increment("k", "x", 1.0, 2_000), Increment("k", "y", 5.0, 2_000)])
    clock.set_us(1_999)
    assert store.read_sync(["k"]) == [{"x": 1.0, "y": 5.0}]
    clock.set_us(2_000)
    assert store.read_sync(["k"]) == [{}]
    # The next window's increment starts a new record, as a Redis key past
    # its TTL would: nothing of the expired one is added to it.
    store.apply_sync("", [Increment("k", "x", 2.0, 3_000)])
    assert store.read_sync(["k"]) == [{"x": 2.0}]


def test_in_process_store_stays_bounded_and_prunes_expired_first() -> None:
    clock = ManualClock(1_000)
    store = InProcessStore(max_keys=100, dedupe_ttl_s=10, clock=clock)
    store.apply_sync("", [Increment("live", "x", 1.0, 0)])
    for i in range(99):
        store.apply_sync("", [Increment(f"old{i}", "x", 1.0, 2_000)])
    clock.set_us(5_000)  # every "old" record has expired now
    for i in range(20):
        store.apply_sync("", [Increment(f"fresh{i}", "x", 1.0, 0)])
    assert len(store) <= 100
    assert store.read_sync(["live", "fresh19", "old0"]) == [{"x": 1.0}, {"x": 1.0}, {}]
    # With nothing expired, the oldest written go first: the bound always holds.
    for i in range(300):
        store.apply_sync("", [Increment(f"more{i}", "x", 1.0, 0)])
    assert len(store) <= 100


async def test_features_match_the_reference_replay(store: FeatureStore) -> None:
    """A synthetic slice applied through the backend gives the same features
    as the in-process reference (what training saw)."""
    data = synth.generate(synth.SynthConfig(seed=11, customers=12, days=2))
    namespace = f"ns{uuid.uuid4().hex[:6]}"
    reference = InProcessStore(max_keys=1_000_000, dedupe_ttl_s=3600, clock=SystemClock())
    # Moved to the present: backends expire by wall time, and synthetic time is in the past.
    now_us = SystemClock().now_us()
    shift_us = now_us - data.events[-1].activity.occurred_at_us
    activities = [
        dataclasses.replace(e.activity, occurred_at_us=e.activity.occurred_at_us + shift_us)
        for e in data.events
    ]
    for activity in activities:
        increments = updates_for(activity, namespace)
        await store.apply(activity.event_id, increments)
        reference.apply_sync(activity.event_id, increments)
    payments = [a for a in activities if a.merchant_id][-8:]
    for activity in payments:
        ref = EntityRef(
            activity.tenant_id, activity.account_id, activity.device_id, activity.merchant_id
        )
        expected = stored_features(reference.read_sync(keys_for(ref, namespace, now_us)))
        actual = await read_stored_features(store, ref, namespace, now_us)
        assert actual == pytest.approx(expected)
        assert actual["acct_lifetime_spend_log"] > 0
