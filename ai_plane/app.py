"""Assembles the AI plane from config: registry, Triton (our own tritonserver,
or ai.triton_url), scorer with its breaker and fallbacks, feature store, NATS
pipeline, bandit, gRPC server.

The plane serves what the registry says is live and trains nothing at start:
models are bootstrapped from above it (`triplane ai bootstrap`, which the dev
supervisor runs before it starts the plane, or a Kubernetes init container).
Started on an empty registry it still serves, answering "no model" with the
reason NO_LIVE_MODEL, and says loudly how to bootstrap."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import JetStreamContext

from ai_plane.bandit import LinearThompsonBandit
from ai_plane.breaker import CircuitBreaker
from ai_plane.engine import AiEngine
from ai_plane.manager import ModelManager, write_live_repository
from ai_plane.ope_log import OpeEvaluator
from ai_plane.outcomes import OutcomeSpine
from ai_plane.permissions import PERMISSIONS
from ai_plane.pipeline import Applier, FeaturePipeline
from ai_plane.registry import Registry, open_registry
from ai_plane.scorer import Scorer
from ai_plane.service import ai_services
from ai_plane.store.base import FeatureStore, build_store
from ai_plane.training import MODEL_FEATURES
from ai_plane.triton import ModelRepository, TritonProcess, TritonUnavailable
from ai_plane.triton_grpc import TritonClient
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import envelope_pb2
from triplane.runtime import bus, tasks
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config
from triplane.runtime.errors import TriplaneError, Unavailable
from triplane.runtime.server import ConnectionAge, PlaneServer, ServerSecurity
from triplane.runtime.tenants import TENANTS_STREAM, TenantDirectory
from triplane.runtime.tls import AI_PLANE

log = logging.getLogger("triplane.ai")


def models_root(config: Config) -> Path:
    path = Path(config.ai.models.dir)
    return path if path.is_absolute() else config.state_path / path


def registry_dir(config: Config) -> Path:
    return models_root(config) / "registry"


def datasets_dir(config: Config) -> Path:
    """Where training datasets live (TrainModel reads them; the tools write them)."""
    return models_root(config) / "datasets"


@dataclass
class AiPlane:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    listen: str | None = None
    # Tests and the benchmark may hand in a running Triton: either our own
    # process (sharing its model repository; the caller stops it), or the
    # address of one that gets the model files in its load requests.
    shared_triton: TritonProcess | None = None
    triton_url: str | None = None
    store: FeatureStore | None = None
    triton_process: TritonProcess | None = None
    engine: AiEngine | None = None
    manager: ModelManager | None = None
    pipeline: FeaturePipeline | None = None
    server: PlaneServer | None = None
    registry: Registry | None = None
    _nats: object | None = None
    spine: OutcomeSpine | None = None
    _follower: asyncio.Task[None] | None = None
    _drift_writer: asyncio.Task[None] | None = None
    _sweeper: asyncio.Task[None] | None = None

    async def _start_triton(self, registry: Registry) -> tuple[str, str, ModelRepository | None]:
        """(gRPC address, HTTP address or "", our repository or None)."""
        ai = self.config.ai
        http = ai.triton_protocol == "http"
        if self.shared_triton is not None:
            write_live_repository(registry, self.shared_triton.repository, ai)
            shared = self.shared_triton
            return shared.url, shared.http_url if http else "", shared.repository
        url = self.triton_url if self.triton_url is not None else ai.triton_url
        if url:
            # An external Triton (a sidecar): its repository is shared when
            # configured, else the files go in the load requests.
            shared_repository = (
                ModelRepository(Path(ai.triton_repository)) if ai.triton_repository else None
            )
            return url, ai.triton_http_url if http else "", shared_repository
        repository = ModelRepository(models_root(self.config) / "triton_repository")
        write_live_repository(registry, repository, ai)
        process = TritonProcess(repository, models_root(self.config) / "triton", ai.triton)
        self.triton_process = process
        try:
            # Spawned from the event loop's thread (it lives as long as the
            # plane); only the wait for readiness runs in a worker thread.
            process.spawn()
            await asyncio.to_thread(process.wait_ready)
            return process.url, process.http_url if http else "", repository
        except TritonUnavailable:
            # A fault, not a mode: every score is answered in-process and says so.
            log.exception("tritonserver could not start; serving with the in-process fallback")
            self.triton_process = None
            return "", "", None

    async def start(self) -> int:
        """Starts everything; returns the bound gRPC port."""
        config, ai = self.config, self.config.ai
        registry = await asyncio.to_thread(open_registry, self.config, self.clock)
        self.registry = registry
        missing = [model for model in MODEL_FEATURES if registry.live(model) is None]
        if missing:
            log.error(
                "NO LIVE MODEL for %s in %s: every score of it answers source 'none' "
                "(NO_LIVE_MODEL) until one is promoted. Bootstrap with "
                "`triplane ai bootstrap` (same config and state dir), or train and promote "
                "with `triplane ai train` / `triplane ai promote`.",
                ", ".join(missing),
                registry.root,
            )
        url, http_url, repository = await self._start_triton(registry)
        triton = TritonClient(url, http_url) if url else None
        if triton is not None and self.triton_process is None and self.shared_triton is None:
            # An external Triton is configured: serving in-process instead
            # would be a silent downgrade (every pod scoring on the plane's
            # CPU, saying so only in each answer). Wait for it, then refuse.
            await self._wait_external_triton(triton, ai.triton.startup_timeout_s)
        elif triton is not None:
            await triton.warm_up(ai.triton.startup_timeout_s)
        breaker = CircuitBreaker(
            ai.breaker.failure_threshold,
            ai.breaker.open_s,
            failure_rate=ai.breaker.failure_rate,
            window_s=ai.breaker.window_s,
        )
        scorer = Scorer(ai, triton, breaker, self.clock)
        store = self.store or build_store(ai.features, self.clock)
        self.store = store
        bandit = LinearThompsonBandit(
            ai.bandit.prior_variance,
            ai.bandit.noise_variance,
            ai.bandit.probability_samples,
            ai.bandit.seed,
            max_arms=ai.bandit.max_arms,
        )
        self.engine = AiEngine(ai, store, scorer, bandit, self.clock)
        self.manager = ModelManager(
            ai, registry, self.engine, triton, repository, datasets_dir(self.config)
        )
        for model in MODEL_FEATURES:
            live = registry.live(model)
            if live is None:
                continue
            if triton is not None and self.triton_process is None:
                # Not started by us with these files: Triton must load them now.
                await self.manager.activate(live)
                continue
            if triton is not None:
                try:
                    await self.manager.warm_up(live)
                except Unavailable:
                    log.exception("warm-up failed; scores fall back until Triton answers")
            self.manager.activate_in_process(live)
        if ai.registry.backend != "file":
            # A shared registry: follow what other replicas promote.
            self._follower = asyncio.create_task(self._follow_registry(registry))
        # The drift history is shared state: written to the registry's store.
        self._drift_writer = asyncio.create_task(
            tasks.every(ai.drift.history_flush_s, self.manager.flush_drift, "writing drift history")
        )
        if config.nats.url and ai.bandit.outcomes == "spine":
            await self._start_spine()
        if self.engine.rewards is not None:
            self._sweeper = asyncio.create_task(self._sweep_windows())
        if config.nats.url and ai.pipeline.enabled:
            await self._start_pipeline()
        self.server = PlaneServer(
            name="ai_plane",
            listen=self.listen or ai.listen,
            services=ai_services(
                self.engine,
                self.manager,
                ai.limits,
                OpeEvaluator(ai.ope, registry, self._ope_jetstream, self.clock.now_us),
            ),
            security=ServerSecurity.from_config(config, AI_PLANE, PERMISSIONS),
            shutdown_grace_s=config.runtime.shutdown_grace_s,
            max_message_bytes=config.runtime.max_message_bytes,
            otel_exporter=config.runtime.otel_exporter,
            on_stop=[self._stop_internals],
            metrics_listen=ai.metrics_listen,
            connection_age=ConnectionAge.from_config(config),
        )
        return await self.server.start()

    async def _wait_external_triton(self, triton: TritonClient, timeout_s: float) -> None:
        """Until the external Triton says it is live (a sidecar may start
        after the plane); TritonUnavailable after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if await triton.warm_up(max(0.1, min(1.0, remaining))):
                return
            if time.monotonic() >= deadline:
                await triton.close()
                raise TritonUnavailable(
                    f"ai.triton_url {triton.url}: no Triton answered within "
                    f"ai.triton.startup_timeout_s={timeout_s:g} s; the plane does not serve "
                    "in-process in place of a configured Triton (start it, or unset "
                    "ai.triton_url to run the plane's own tritonserver)"
                )
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def _follow_registry(self, registry: Registry) -> None:
        """Each ai.registry.poll_interval_s: when the registry's generation
        moved (a train, promotion or rollback by any replica or the CLI), load
        every live version this replica does not serve yet into its Triton.
        A failed load is tried again at the next poll."""
        assert self.manager is not None
        interval = self.config.ai.registry.poll_interval_s
        seen: int | None = None
        while True:
            try:
                generation = await asyncio.to_thread(registry.generation)
                if generation != seen:
                    await self.manager.follow()
                    seen = generation
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following the model registry failed; trying again")
            await asyncio.sleep(interval)

    async def _ope_jetstream(self) -> JetStreamContext | None:
        """Where off-policy evaluation reads the exposure log (None: no NATS)."""
        if not self.config.nats.url:
            return None
        nc = await self._connect()
        return nc.jetstream()  # type: ignore[attr-defined,no-any-return]

    async def _connect(self) -> object:
        if self._nats is None:
            self._nats = await bus.connect(self.config.nats, "ai_plane")
        return self._nats

    async def _start_spine(self) -> None:
        """Outcomes through TRIPLANE_AI: every replica's bandit learns each
        one, resuming from the newest posterior snapshot (ai_plane/outcomes.py)."""
        assert self.engine is not None
        nc = await self._connect()
        rewards = self.engine.rewards
        spine = OutcomeSpine(
            nc.jetstream(),  # type: ignore[attr-defined]
            self.config.nats,
            self.config.ai,
            rewards if rewards is not None else self.engine.learner,
            self.clock.now_us,
        )
        await spine.start()
        self.spine = self.engine.spine = spine

    async def _sweep_windows(self) -> None:
        """The contextual learner's reward windows: every
        ai.learner.sweep_interval_s, a 0 for each shown ranking whose window
        closed without an outcome (any replica may sweep; each window's
        reward has one id, counted once)."""
        assert self.engine is not None
        interval = self.config.ai.learner.sweep_interval_s
        owner = uuid.uuid4().hex
        while True:
            await asyncio.sleep(interval)
            try:
                # One replica an interval (a Redis claim expiring with it).
                if await self.engine.pending.claim_sweep(owner, int(interval * 1000)):
                    await self.engine.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reward window sweep failed; trying again next interval")

    async def _start_pipeline(self) -> None:
        assert self.engine is not None and self.store is not None
        nc = await self._connect()
        js = nc.jetstream()  # type: ignore[attr-defined]
        await bus.ensure_streams(
            js, self.config.nats, ["TRIPLANE_MONEY", "TRIPLANE_GATEWAY", TENANTS_STREAM]
        )
        applier = Applier(
            self.store,
            self.config.ai.features.namespace,
            on_outcome=self._on_outcome,
            tenants=TenantDirectory(js, self.config.nats.tenant_directory, self.clock),
        )
        self.pipeline = FeaturePipeline(js, self.config.ai.pipeline, applier)
        await self.pipeline.start()

    async def _on_outcome(
        self, envelope: envelope_pb2.EventEnvelope, event: ai_pb2.OfferOutcomeEvent
    ) -> None:
        assert self.engine is not None
        try:
            await self.engine.outcome(
                envelope.tenant_id,
                event.rank_id,
                event.offer_id,
                event.reward,
                envelope.event_id,
                kind=int(event.kind),
                value_minor=event.value.amount_minor if event.HasField("value") else None,
                # Late or not by when the outcome was recorded, not when the
                # pipeline got to it (after an outage of this plane, say).
                at_us=envelope.occurred_at.ToMicroseconds() or None,
            )
        except Unavailable:
            raise  # the spine did not take it: left for redelivery
        except TriplaneError as error:
            # An outcome for a ranking this instance no longer remembers: drop it.
            log.info("offer outcome not applied: %s", error.reason)

    async def _stop_internals(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self._drift_writer is not None:
            self._drift_writer.cancel()
            await asyncio.gather(self._drift_writer, return_exceptions=True)
            assert self.manager is not None
            try:
                await self.manager.flush_drift()  # what this replica recorded last
            except Exception:
                log.exception("writing the last drift history points failed")
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self.spine is not None:
            await self.spine.stop()  # takes the shutdown snapshot
        if self._nats is not None:
            await self._nats.close()  # type: ignore[attr-defined]
        if self.engine is not None:
            await self.engine.scorer.close()
            await self.engine.pending.close()
            if self.engine.rewards is not None:
                self.engine.rewards.vw.close()
        if self.store is not None:
            await self.store.close()
        if self.triton_process is not None:
            await asyncio.to_thread(self.triton_process.stop)
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        else:
            await self._stop_internals()
