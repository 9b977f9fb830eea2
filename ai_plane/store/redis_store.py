"""Redis backend: one hash per record, one Lua script per event, so the dedupe
marker and every increment of an event commit atomically (no double count on
redelivery, no lost update on a crash between the two)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from ai_plane.features import Increment

# KEYS[1]: dedupe marker (ARGV[1] its TTL in ms, "0": no dedupe);
# KEYS[2..]: records; ARGV from 2: field, delta, expire_at_ms per record key.
_APPLY_LUA = """
if ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
    return 0
  end
end
for i = 2, #KEYS do
  local a = 2 + (i - 2) * 3
  redis.call('HINCRBYFLOAT', KEYS[i], ARGV[a], ARGV[a + 1])
  local expire_at_ms = tonumber(ARGV[a + 2])
  if expire_at_ms > 0 then
    redis.call('PEXPIREAT', KEYS[i], expire_at_ms)
  end
end
return 1
"""


class RedisStore:
    name = "redis"

    def __init__(self, url: str, dedupe_ttl_s: int, key_prefix: str = "") -> None:
        self._client: Any = aioredis.from_url(url, decode_responses=True)
        self._dedupe_ttl_ms = dedupe_ttl_s * 1000
        self._prefix = key_prefix
        self._script: Any = self._client.register_script(_APPLY_LUA)

    async def apply(self, event_id: str, increments: Sequence[Increment]) -> bool:
        keys = [f"{self._prefix}applied:{event_id}" if event_id else f"{self._prefix}-"]
        args: list[str | float | int] = [self._dedupe_ttl_ms if event_id else 0]
        for inc in increments:
            keys.append(self._prefix + inc.key)
            args += [inc.field, repr(inc.delta), inc.expire_at_us // 1000]
        applied = await self._script(keys=keys, args=args)
        return bool(applied)

    async def read(self, keys: Sequence[str]) -> list[Mapping[str, float]]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._prefix + key)
        rows: list[dict[str, str]] = await pipe.execute()
        return [{name: float(value) for name, value in row.items()} for row in rows]

    async def close(self) -> None:
        await self._client.aclose()
