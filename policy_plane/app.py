"""Wiring: config -> store, keys, engine, gRPC server and background tasks
(case-event relay to NATS, decision-log retention, NATS KV bundle watch)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from policy_plane import bundle_sync, codec
from policy_plane.decision_log import LogKeys
from policy_plane.engine import PolicyEngine
from policy_plane.permissions import PERMISSIONS
from policy_plane.pii import DecisionSealer, load_cipher
from policy_plane.service import services
from policy_plane.store import PolicyStore, open_store
from triplane.runtime import bus
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config, ConfigError
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.server import ConnectionAge, PlaneServer, ServerSecurity
from triplane.runtime.tasks import cancel_and_wait, every
from triplane.runtime.tls import POLICY_PLANE
from triplane.runtime.tokens import (
    PublicKeySet,
    TokenSigner,
    ensure_dev_keypair,
    ensure_dev_log_keypair,
    key_id_of,
    private_key_from_b64,
)

log = logging.getLogger("policy_plane.app")


def load_private_key(config: Config) -> SigningKey:
    """The decision-token signing key (the dev one when none is configured)."""
    path = config.keys.policy_private_key_path
    if not path:
        path = str(ensure_dev_keypair(config.state_path)[0])
    return private_key_from_b64(Path(path).read_text())


def load_log_keys(config: Config, token_key: SigningKey) -> LogKeys:
    """The decision log's signing key and the earlier log keys it still
    verifies with. Never the token key: a token key that leaks (it signs on
    every decision, the money plane holds its public half) must not be able
    to rewrite the log."""
    keys = config.keys
    path = keys.decision_log_private_key_path or str(ensure_dev_log_keypair(config.state_path)[0])
    log_key = private_key_from_b64(Path(path).read_text())
    if key_id_of(log_key.verify_key) == key_id_of(token_key.verify_key):
        raise ConfigError(
            "keys.decision_log_private_key_path: the decision log must be signed with another "
            "key than decision tokens (keys.policy_private_key_path)"
        )
    earlier: list[VerifyKey] = []
    if keys.decision_log_public_keys or keys.decision_log_public_key_paths:
        known = PublicKeySet(
            keys.decision_log_public_keys,
            [Path(p) for p in keys.decision_log_public_key_paths],
        )
        earlier = [k for k in (known.get(i) for i in known.key_ids()) if k is not None]
    return LogKeys(log_key, earlier)


def open_policy_store(config: Config) -> PolicyStore:
    store_config = config.policy.store
    sqlite_path = Path(store_config.sqlite_path)
    if not sqlite_path.is_absolute():
        sqlite_path = config.state_path / sqlite_path
    return open_store(
        store_config.backend,
        str(sqlite_path),
        store_config.postgres_dsn,
        store_config.read_connections,
    )


def build_engine(config: Config, clock: Clock | None = None) -> PolicyEngine:
    key = load_private_key(config)
    return PolicyEngine(
        config.policy,
        open_policy_store(config),
        TokenSigner(key),
        load_log_keys(config, key),
        clock or SystemClock(),
        codec.case_resolved_event,
        DecisionSealer(load_cipher(config.policy.pii, config.state_path)),
    )


@dataclass
class PolicyPlane:
    config: Config
    engine: PolicyEngine
    server: PlaneServer
    nats: NatsClient | None = None
    js: JetStreamContext | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    relay: OutboxRelay = field(init=False)

    def __post_init__(self) -> None:
        outbox = self.config.policy.outbox
        self.relay = OutboxRelay(
            self.engine.store,
            self.config.nats,
            RelaySettings(
                streams=["TRIPLANE_POLICY"],
                batch_size=outbox.relay_batch_size,
                idle_poll_s=outbox.relay_interval_s,
                retry=outbox.relay_retry,
            ),
            self.engine.clock,
            client_name="policy-plane-relay",
        )

    async def start(self) -> int:
        await self.engine.start()
        self.engine.case_event_hooks.append(self.kick_relay)
        if self.config.nats.url:
            self.nats = await bus.connect(self.config.nats, "policy_plane")
            self.js = self.nats.jetstream()
            await bus.ensure_streams(self.js, self.config.nats, ["TRIPLANE_POLICY"])
            self._spawn("case-event-relay", self._relay_loop)
            if self.config.policy.bundles.kv_watch:
                self._spawn("bundle-kv-watch", self._watch_bundles)
        else:
            log.warning(
                "nats.url is empty: case events stay in the outbox until NATS is configured"
            )
        self._spawn("decision-log-retention", self._retention_loop)
        if self.config.policy.bundles.follow_interval_s > 0:
            self._spawn("bundle-follow", self._follow_bundles)
        self.server.on_stop.append(self.stop_background)
        return await self.server.start()

    def _spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        async def guarded() -> None:
            await factory()

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def relay_once(self) -> int:
        """Publishes pending case events; returns how many JetStream acknowledged."""
        if self.js is None:
            return 0
        sent, _ = await self.relay.relay_once(self.js)
        return sent

    def kick_relay(self) -> None:
        self.relay.kick()

    async def _relay_loop(self) -> None:
        assert self.js is not None
        await self.relay.run_with(self.js)

    async def _retention_loop(self) -> None:
        while True:
            try:
                purged = await self.engine.purge_expired()
                if purged:
                    log.info("decision log retention purged %d records", purged)
            except Exception:
                log.exception("decision log retention failed")
            await asyncio.sleep(self.config.policy.decision_log.retention_sweep_interval_s)

    async def _follow_bundles(self) -> None:
        """Each policy.bundles.follow_interval_s: the store's live and shadow
        slots made current here (a switch made through another replica)."""
        await every(
            self.config.policy.bundles.follow_interval_s,
            functools.partial(asyncio.to_thread, self.engine.bundles.follow),
            "following the store's bundle slots",
        )

    async def _watch_bundles(self) -> None:
        assert self.js is not None
        bundles = self.config.policy.bundles
        await bundle_sync.watch(
            self.js,
            self.engine.bundles,
            bundles.kv_bucket,
            bundles.kv_key,
            self.config.policy.limits.max_bundle_bytes,
        )

    async def stop_background(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        await self.engine.stop()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                await self.nats.close()
            self.nats = None
        self.engine.store.db.close()

    async def stop(self) -> None:
        await self.server.stop()


def build_plane(
    config: Config, clock: Clock | None = None, listen: str | None = None
) -> PolicyPlane:
    engine = build_engine(config, clock)
    server = PlaneServer(
        name="policy_plane",
        listen=listen or config.policy.listen,
        services=services(engine),
        security=ServerSecurity.from_config(config, POLICY_PLANE, PERMISSIONS),
        shutdown_grace_s=config.runtime.shutdown_grace_s,
        max_message_bytes=config.runtime.max_message_bytes,
        otel_exporter=config.runtime.otel_exporter,
        metrics_listen=config.policy.metrics_listen,
        connection_age=ConnectionAge.from_config(config),
    )
    return PolicyPlane(config=config, engine=engine, server=server)
