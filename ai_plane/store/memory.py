"""The embedded default: a bounded dict inside the AI plane's process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from ai_plane.features import Increment
from triplane.runtime.clock import Clock

_EMPTY: Mapping[str, float] = MappingProxyType({})


class InProcessStore:
    """Records and applied event ids in memory, both bounded by `max_keys`.

    Expiry is judged by the injected clock (a training replay moves it with
    event time), as Redis and Aerospike judge their TTLs: an expired record
    reads as empty and an increment to it starts afresh; an increment that is
    already expired when it arrives (history older than its window) writes
    nothing. Beyond the bound, expired records go first, then the oldest
    written. Dropping a dedupe marker early could let a very late redelivery
    count twice, so the bound should sit well above the working set.
    """

    name = "in_process"

    def __init__(self, max_keys: int, dedupe_ttl_s: int, clock: Clock) -> None:
        assert max_keys > 0 and dedupe_ttl_s > 0
        self._max_keys = max_keys
        self._dedupe_ttl_us = dedupe_ttl_s * 1_000_000
        self._clock = clock
        self._records: dict[str, dict[str, float]] = {}
        self._expiry_us: dict[str, int] = {}
        self._applied: dict[str, int] = {}

    def apply_sync(self, event_id: str, increments: Sequence[Increment]) -> bool:
        now_us = self._clock.now_us()
        if event_id:
            seen_until = self._applied.get(event_id)
            if seen_until is not None and seen_until > now_us:
                return False
            self._applied[event_id] = now_us + self._dedupe_ttl_us
            if len(self._applied) > self._max_keys:
                self._prune_applied(now_us)
        records, expiry = self._records, self._expiry_us
        for inc in increments:
            if 0 < inc.expire_at_us <= now_us:
                continue
            record = records.get(inc.key)
            if record is None or 0 < expiry[inc.key] <= now_us:
                record = records[inc.key] = {}
                expiry[inc.key] = inc.expire_at_us
            record[inc.field] = record.get(inc.field, 0.0) + inc.delta
        if len(records) > self._max_keys:
            self._prune_records()
        return True

    def read_sync(self, keys: Sequence[str]) -> list[Mapping[str, float]]:
        records, expiry, now_us = self._records, self._expiry_us, self._clock.now_us()
        return [
            record
            if (record := records.get(key)) is not None and not 0 < expiry[key] <= now_us
            else _EMPTY
            for key in keys
        ]

    async def apply(self, event_id: str, increments: Sequence[Increment]) -> bool:
        return self.apply_sync(event_id, increments)

    async def read(self, keys: Sequence[str]) -> list[Mapping[str, float]]:
        return self.read_sync(keys)

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._records)

    def _prune_records(self) -> None:
        now_us = self._clock.now_us()
        expired = [k for k, at in self._expiry_us.items() if 0 < at <= now_us]
        for key in expired:
            del self._records[key], self._expiry_us[key]
        overflow = len(self._records) - self._max_keys
        if overflow <= 0:
            return
        # Still over the bound: drop the oldest written (dicts keep insertion
        # order), a tenth more than needed so pruning does not run every write.
        for key in list(self._records)[: overflow + self._max_keys // 10]:
            del self._records[key], self._expiry_us[key]

    def _prune_applied(self, now_us: int) -> None:
        for event_id in [e for e, until in self._applied.items() if until <= now_us]:
            del self._applied[event_id]
        overflow = len(self._applied) - self._max_keys
        for event_id in list(self._applied)[: max(0, overflow)]:
            del self._applied[event_id]
