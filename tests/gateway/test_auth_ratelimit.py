"""Per-credential rate limits: the in-process token bucket (injected clock)
and the shared GCRA bucket in the real Redis, which two limiters (two
gateway replicas) draw from together."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.auth.ratelimit import RATE_LIMITED, LocalBuckets, RateClass, RateLimiter, rate_class
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ConfigError, GatewayRateLimitConfig, load_config
from triplane.runtime.errors import ResourceExhausted


def _config(**changes: Any) -> GatewayRateLimitConfig:
    limit = {"rate_per_s": 10, "burst": 5, **changes}
    return load_config(environ={}, overrides={"gateway": {"rate_limit": limit}}).gateway.rate_limit


def _drain(limiter: RateLimiter, credential: str, limits: RateClass) -> int:
    """Calls allowed in a row before the first refusal."""
    allowed = 0
    while True:
        try:
            limiter.check_local(credential, limits)
        except ResourceExhausted:
            return allowed
        allowed += 1


def test_a_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    clock = ManualClock()
    limiter = RateLimiter(_config(), clock)
    limits = rate_class(limiter.config, "payments:write")
    assert _drain(limiter, "key-a", limits) == 5
    with pytest.raises(ResourceExhausted) as refused:
        limiter.check_local("key-a", limits)
    assert refused.value.reason == RATE_LIMITED
    assert refused.value.retry_delay_s == pytest.approx(0.1)
    # Another credential has its own bucket.
    assert _drain(limiter, "key-b", limits) == 5
    # After the wait it says, one more call goes through, and no more.
    clock.advance(0.1)
    limiter.check_local("key-a", limits)
    with pytest.raises(ResourceExhausted):
        limiter.check_local("key-a", limits)
    # A full second refills rate_per_s tokens, capped at the burst.
    clock.advance(10)
    assert _drain(limiter, "key-a", limits) == 5


def test_a_scope_with_its_own_limits_has_its_own_bucket() -> None:
    limiter = RateLimiter(
        _config(per_scope={"events:write": {"rate_per_s": 100, "burst": 2}}), ManualClock()
    )
    events = rate_class(limiter.config, "events:write")
    payments = rate_class(limiter.config, "payments:write")
    assert (events.name, events.burst) == ("events:write", 2)
    assert (payments.name, payments.burst) == ("", 5)
    assert _drain(limiter, "key-a", events) == 2
    assert _drain(limiter, "key-a", payments) == 5


def test_buckets_are_bounded() -> None:
    buckets = LocalBuckets(3, ManualClock())
    limits = RateClass("", 1.0, 1.0)
    for index in range(10):
        assert buckets.take(f"key-{index}", limits) == 0.0
    assert len(buckets) == 3


def test_limits_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match=r"rate_per_s > 0"):
        _config(rate_per_s=0)
    with pytest.raises(ConfigError, match=r"per_scope\.events:write"):
        _config(per_scope={"events:write": {"rate_per_s": 1, "burst": 0}})


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_replicas_share_one_bucket_in_redis(redis_client: Any, redis_url: str) -> None:
    config = _config(
        rate_per_s=1, burst=4, redis_url=redis_url, redis_key_prefix=f"t:{uuid.uuid4().hex}:"
    )
    replicas = [RateLimiter(config, ManualClock(), redis_client) for _ in range(2)]
    assert all(r.shared for r in replicas)
    limits = rate_class(config, "payments:write")
    allowed, refusals = 0, []
    for index in range(8):
        try:
            await replicas[index % 2].check("key-a", limits)
            allowed += 1
        except ResourceExhausted as exc:
            refusals.append(exc)
    # One bucket for both: its burst, not twice it.
    assert allowed == 4
    assert refusals and all(r.reason == RATE_LIMITED for r in refusals)
    # One token a second: the wait is at most a second, and more than nothing.
    assert all(0 < r.retry_delay_s <= 1.0 for r in refusals)
    # The bucket's key expires by itself (Redis keeps only busy credentials).
    keys = await redis_client.keys(f"{config.redis_key_prefix}*")
    assert len(keys) == 1 and 0 < await redis_client.pttl(keys[0]) <= 5_000
    # Another credential is not held up.
    await replicas[0].check("key-b", limits)


async def test_a_redis_that_fails_leaves_the_decision_to_this_replica() -> None:
    config = _config(burst=3, redis_url="redis://127.0.0.1:1/0", redis_timeout_ms=200)
    from gateway.auth.ratelimit import connect_redis

    limiter = RateLimiter(config, ManualClock(), connect_redis(config))
    limits = rate_class(config, "payments:write")
    for _ in range(3):
        await limiter.check("key-a", limits)
    with pytest.raises(ResourceExhausted):
        await limiter.check("key-a", limits)
    await limiter.close()
