"""The online store contract and the helpers every caller uses on top of it.

The contract is deliberately small, so that every backend can keep it exactly:

* `apply(event_id, increments)` adds every increment and remembers `event_id`
  for `dedupe_ttl_s`, as one idempotent unit: applying the same event_id again
  changes nothing and returns False (redelivery never double-counts).
  An empty event_id applies without dedupe (training replays, tests).
* `read(keys)` returns one field -> value mapping per key, `{}` for a missing
  key, in the order asked. Callers treat the mappings as read-only.
* Records expire at their increment's `expire_at_us` (0: never).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ai_plane.features import EntityRef, Increment, keys_for, stored_features
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import AiFeaturesConfig


class FeatureStore(Protocol):
    name: str

    async def apply(self, event_id: str, increments: Sequence[Increment]) -> bool: ...

    async def read(self, keys: Sequence[str]) -> list[Mapping[str, float]]: ...

    async def close(self) -> None: ...


async def read_stored_features(
    store: FeatureStore, ref: EntityRef, namespace: str, now_us: int
) -> dict[str, float]:
    """The store-backed features of one payment's entities, in one batch read."""
    keys = keys_for(ref, namespace, now_us)
    return stored_features(await store.read(keys))


def build_store(config: AiFeaturesConfig, clock: Clock | None = None) -> FeatureStore:
    """The configured backend (clients are imported only when selected)."""
    if config.backend == "redis":
        from ai_plane.store.redis_store import RedisStore

        return RedisStore(config.redis_url, config.dedupe_ttl_s)
    if config.backend == "aerospike":
        from ai_plane.store.aerospike_store import AerospikeStore

        return AerospikeStore(
            config.aerospike_hosts,
            config.aerospike_namespace,
            config.aerospike_set,
            config.dedupe_ttl_s,
            config.read_timeout_ms,
        )
    from ai_plane.store.memory import InProcessStore

    return InProcessStore(config.in_process_max_keys, config.dedupe_ttl_s, clock or SystemClock())
