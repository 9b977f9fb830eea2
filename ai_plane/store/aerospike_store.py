"""Aerospike backend (the production target), written against the Python
client's documentation: no Aerospike server could be run where this was
written, so its contract suite runs only when AEROSPIKE_HOSTS is set.

* A record per key (the user key is the store key) in `namespace`/`set`;
  fields are bins (names kept under Aerospike's 15-character bin limit).
* `apply` writes a dedupe record per event_id with create-only policy first,
  then one `operate` per record: atomic `increment`s of its bins plus the TTL
  in the same call. Aerospike has no multi-record atomicity outside its
  transactions, so a crash between the two steps loses that event's update
  (at-most-once for that event) rather than double-counting it.
* `read` is one `batch_read` of every key.

The client is synchronous; calls run in a thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ai_plane.features import Increment

MAX_BIN_NAME = 15


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().partition(":")
        if host:
            out.append((host, int(port or 3000)))
    assert out, "aerospike_hosts names no host"
    return out


def ttl_for(expire_at_us: int, now_us: int, never: int) -> int:
    """Aerospike TTLs are relative seconds; at least 1 so the write stands."""
    if expire_at_us == 0:
        return never
    return max(1, (expire_at_us - now_us) // 1_000_000)


class AerospikeStore:
    name = "aerospike"

    def __init__(
        self, hosts: str, namespace: str, set_name: str, dedupe_ttl_s: int, timeout_ms: float
    ) -> None:
        import aerospike

        self._aerospike: Any = aerospike
        timeout = max(1, int(timeout_ms))
        config = {
            "hosts": parse_hosts(hosts),
            "policies": {"read": {"total_timeout": timeout}, "batch": {"total_timeout": timeout}},
        }
        self._client: Any = aerospike.client(config)
        if not self._client.is_connected():
            self._client.connect()
        self._namespace, self._set = namespace, set_name
        self._dedupe_ttl_s = dedupe_ttl_s

    def _key(self, key: str) -> tuple[str, str, str]:
        return (self._namespace, self._set, key)

    def _apply_sync(self, event_id: str, increments: Sequence[Increment]) -> bool:
        from aerospike_helpers.operations import operations

        if event_id:
            try:
                self._client.put(
                    self._key(f"applied:{event_id}"),
                    {"at": int(time.time())},
                    meta={"ttl": self._dedupe_ttl_s},
                    policy={"exists": self._aerospike.POLICY_EXISTS_CREATE},
                )
            except self._aerospike.exception.RecordExistsError:
                return False
        now_us = time.time_ns() // 1000
        by_key: dict[str, list[Increment]] = {}
        for inc in increments:
            assert len(inc.field) <= MAX_BIN_NAME, inc.field
            by_key.setdefault(inc.key, []).append(inc)
        never = self._aerospike.TTL_NEVER_EXPIRE
        for key, items in by_key.items():
            ops = [operations.increment(inc.field, float(inc.delta)) for inc in items]
            ttl = ttl_for(items[0].expire_at_us, now_us, never)
            self._client.operate(self._key(key), ops, meta={"ttl": ttl})
        return True

    def _read_sync(self, keys: Sequence[str]) -> list[Mapping[str, float]]:
        batch = self._client.batch_read([self._key(k) for k in keys])
        out: list[Mapping[str, float]] = []
        for item in batch.batch_records:
            record = item.record
            bins = record[2] if item.result == 0 and record is not None else None
            out.append({name: float(value) for name, value in (bins or {}).items()})
        return out

    async def apply(self, event_id: str, increments: Sequence[Increment]) -> bool:
        return await asyncio.to_thread(self._apply_sync, event_id, increments)

    async def read(self, keys: Sequence[str]) -> list[Mapping[str, float]]:
        return await asyncio.to_thread(self._read_sync, keys)

    async def close(self) -> None:
        self._client.close()
