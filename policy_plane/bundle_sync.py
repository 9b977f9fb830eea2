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


# Values of the key kept (a short rollout history), and the room around a
# bundle's bytes that its JSON envelope (label, field names, escapes) takes.
HISTORY = 5
_ENVELOPE_BYTES = 4096


def max_value_bytes_of(max_bundle_bytes: int) -> int:
    """The largest KV value a bundle of max_bundle_bytes makes. JSON escapes
    may grow a text, so a value over this is refused before it is decoded."""
    return 2 * max_bundle_bytes + _ENVELOPE_BYTES


async def bucket(js: JetStreamContext, name: str, max_bundle_bytes: int) -> KeyValue:
    """The rollout bucket, created bounded: each value (the NATS server also
    caps it at its max_payload) and the whole bucket (HISTORY values of the
    key, and as many again for stray keys), so a writer cannot fill the
    server's storage through it."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        value_bytes = max_value_bytes_of(max_bundle_bytes)
        return await js.create_key_value(
            bucket=name,
            history=HISTORY,
            max_value_size=value_bytes,
            max_bytes=2 * HISTORY * value_bytes,
        )


async def publish_bundle(
    js: JetStreamContext, name: str, key: str, source: BundleSource, max_bundle_bytes: int
) -> int:
    kv = await bucket(js, name, max_bundle_bytes)
    return int(await kv.put(key, msgspec.json.encode(source)))


async def apply_value(registry: BundleRegistry, value: bytes, max_bundle_bytes: int) -> str:
    """Makes the bundle in `value` live; returns its version, or "" when refused.

    A value is refused the way LoadBundle refuses a bundle (the same bounds:
    size, anchors and aliases, nesting, CEL size), and whatever goes wrong
    with one value is logged and leaves the live bundle and the watch as they
    were, so the next value still applies."""
    if len(value) > max_value_bytes_of(max_bundle_bytes):
        log.error(
            "bundle from NATS KV refused; the live bundle stays: BUNDLE_TOO_LARGE "
            "(a value of %d bytes)",
            len(value),
        )
        return ""
    try:
        source = msgspec.json.decode(value, type=BundleSource)
        info = await asyncio.to_thread(registry.load, source, "live")
    except TriplaneError as exc:
        log.error(
            "bundle from NATS KV refused; the live bundle stays: %s (%s) %s",
            exc.reason,
            exc.field,
            exc.message,
        )
        return ""
    except msgspec.DecodeError as exc:
        log.error("bundle from NATS KV refused; the live bundle stays: BUNDLE_UNREADABLE %s", exc)
        return ""
    except Exception:
        log.exception("bundle from NATS KV failed to load; the live bundle stays")
        return ""
    log.info("bundle %s is live (from NATS KV)", info.version)
    return info.version


async def watch(
    js: JetStreamContext, registry: BundleRegistry, name: str, key: str, max_bundle_bytes: int
) -> None:
    """Runs until cancelled: applies every new value of the key."""
    kv = await bucket(js, name, max_bundle_bytes)
    watcher = await kv.watch(key)
    try:
        async for entry in watcher:
            # None marks the end of the initial values; deletes carry no value.
            if entry is None or not entry.value:
                continue
            await apply_value(registry, entry.value, max_bundle_bytes)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
