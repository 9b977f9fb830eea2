"""Per-credential rate limits: a token bucket for each credential (and, where
configured, each scope), so one partner's burst cannot starve the others.

A bucket holds up to `burst` calls and refills at `rate_per_s`; a call that
finds it empty is RESOURCE_EXHAUSTED RATE_LIMITED with the wait until the next
token as a `google.rpc.RetryInfo` (retry_delay), so a client backs off by
exactly what is needed.

In memory by default: one bucket per key in a bounded LRU (a bucket pushed out
starts full again, which only ever lets a quiet credential through). With
`gateway.rate_limit.redis_url` the buckets live in Redis and every replica
shares them: GCRA (the generic cell rate algorithm, the token bucket kept as
one "theoretical arrival time" per key) in one Lua script, so a check is one
round trip and atomic without redis-cell. The script reads Redis's own clock
(TIME), so replicas with different clocks still agree. A Redis that fails or
does not answer within `redis_timeout_ms` hands the decision to this
replica's own bucket (logged), so the limit holds per replica rather than
not at all."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayRateLimitConfig
from triplane.runtime.errors import ResourceExhausted

log = logging.getLogger("gateway.auth.ratelimit")

RATE_LIMITED = "RATE_LIMITED"
_US = 1_000_000
# A failing Redis is logged at most this often.
REDIS_ERROR_LOG_INTERVAL_S = 10.0

# KEYS[1]: the bucket. ARGV[1]: microseconds between calls at the steady
# rate; ARGV[2]: the burst's tolerance (burst x interval). Returns {1, 0} when
# the call may go, else {0, microseconds until it may}. The key expires when
# its bucket would be full again, so Redis holds only busy credentials.
GCRA_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
  math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"""


@dataclass(frozen=True, slots=True)
class RateClass:
    """The limits a method is counted under: its bucket's suffix (the scope,
    when the scope has its own limits, else ""), rate and burst."""

    name: str
    rate_per_s: float
    burst: float


def rate_class(config: GatewayRateLimitConfig, scope: str) -> RateClass:
    own = config.per_scope.get(scope)
    if own is None:
        return RateClass("", config.rate_per_s, config.burst)
    return RateClass(scope, own.rate_per_s, own.burst)


class _Bucket:
    __slots__ = ("tokens", "updated_us")

    def __init__(self, tokens: float, updated_us: int) -> None:
        self.tokens = tokens
        self.updated_us = updated_us


class LocalBuckets:
    """Token buckets in this process, at most `max_buckets` of them."""

    def __init__(self, max_buckets: int, clock: Clock) -> None:
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._max = max_buckets
        self._clock = clock

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, limits: RateClass) -> float:
        """Takes a token: 0.0 when there was one, else the seconds until there is."""
        now_us = self._clock.now_us()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(limits.burst, now_us)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed_s = max(0, now_us - bucket.updated_us) / _US
            bucket.tokens = min(limits.burst, bucket.tokens + elapsed_s * limits.rate_per_s)
            bucket.updated_us = now_us
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / limits.rate_per_s


def refused(credential_id: str, limits: RateClass, retry_delay_s: float) -> ResourceExhausted:
    what = f"scope {limits.name}" if limits.name else "calls"
    return ResourceExhausted(
        RATE_LIMITED,
        f"rate limit of {limits.rate_per_s:g}/s (burst {limits.burst:g}) for {what} reached; "
        f"retry in {retry_delay_s:.3f} s",
        metadata={"credential_id": credential_id, "rate_class": limits.name or "default"},
        retry_delay_s=retry_delay_s,
    )


class RateLimiter:
    """Checks a credential's call against its bucket, in this process or in
    Redis (`redis` is a `redis.asyncio.Redis`, or None)."""

    def __init__(self, config: GatewayRateLimitConfig, clock: Clock, redis: Any = None) -> None:
        self.config = config
        self.local = LocalBuckets(config.max_buckets, clock)
        self._clock = clock
        self._redis = redis
        self._script = redis.register_script(GCRA_SCRIPT) if redis is not None else None
        self._logged_at_us = -(10**18)

    @property
    def shared(self) -> bool:
        """True when the buckets live in Redis (every check is a round trip)."""
        return self._script is not None

    def check_local(self, credential_id: str, limits: RateClass) -> None:
        delay_s = self.local.take(f"{credential_id}\x1f{limits.name}", limits)
        if delay_s > 0:
            raise refused(credential_id, limits, delay_s)

    async def check(self, credential_id: str, limits: RateClass) -> None:
        if self._script is None:
            self.check_local(credential_id, limits)
            return
        interval_us = _US / limits.rate_per_s
        key = f"{self.config.redis_key_prefix}{credential_id}:{limits.name}"
        try:
            allowed, wait_us = await self._script(
                keys=[key], args=[f"{interval_us:.3f}", f"{interval_us * limits.burst:.3f}"]
            )
        except Exception as exc:  # timeouts, connection errors, script errors
            self._log_redis_error(exc)
            self.check_local(credential_id, limits)
            return
        if not int(allowed):
            raise refused(credential_id, limits, max(int(wait_us), 1) / _US)

    def _log_redis_error(self, exc: Exception) -> None:
        now_us = self._clock.now_us()
        if now_us - self._logged_at_us >= REDIS_ERROR_LOG_INTERVAL_S * _US:
            self._logged_at_us = now_us
            log.warning("rate limits: Redis failed (%s); this replica's buckets decide", exc)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def connect_redis(config: GatewayRateLimitConfig) -> Any:
    """A redis.asyncio client for `redis_url` with the configured timeout."""
    import redis.asyncio as aioredis

    timeout_s = config.redis_timeout_ms / 1000.0
    return aioredis.Redis.from_url(
        config.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
