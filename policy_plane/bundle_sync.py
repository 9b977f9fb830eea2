"""Fleet-wide bundle rollout through a NATS KV key.

An operator (or CI) puts a bundle source on `policy.bundles.kv_bucket` /
`kv_key`; every policy plane watching the key compiles it and, when it is good,
makes it live. A bad bundle is refused by each plane, which logs why and keeps
its live bundle.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from policy_plane.bundle import BundleSource
from policy_plane.bundles_registry import BundleRegistry
from triplane.runtime.errors import TriplaneError

log = logging.getLogger("policy_plane.bundle_sync")


async def bucket(js: JetStreamContext, name: str, max_value_bytes: int) -> KeyValue:
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            bucket=name, history=5, max_value_size=max_value_bytes + 4096
        )


async def publish_bundle(
    js: JetStreamContext, name: str, key: str, source: BundleSource, max_value_bytes: int
) -> int:
    kv = await bucket(js, name, max_value_bytes)
    return int(await kv.put(key, msgspec.json.encode(source)))


async def apply_value(registry: BundleRegistry, value: bytes) -> str:
    """Makes the bundle in `value` live; returns its version, or "" when refused."""
    try:
        source = msgspec.json.decode(value, type=BundleSource)
        info = await asyncio.to_thread(registry.load, source, "live")
    except (msgspec.DecodeError, TriplaneError) as exc:
        log.error("bundle from NATS KV refused; the live bundle stays: %s", exc)
        return ""
    log.info("bundle %s is live (from NATS KV)", info.version)
    return info.version


async def watch(
    js: JetStreamContext, registry: BundleRegistry, name: str, key: str, max_value_bytes: int
) -> None:
    """Runs until cancelled: applies every new value of the key."""
    kv = await bucket(js, name, max_value_bytes)
    watcher = await kv.watch(key)
    try:
        async for entry in watcher:
            # None marks the end of the initial values; deletes carry no value.
            if entry is None or not entry.value:
                continue
            await apply_value(registry, entry.value)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
