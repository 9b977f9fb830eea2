"""Model lifecycle: train into the registry, promote, roll back, and make
serving follow (Triton loads the version without a restart, the in-process
copy is swapped, drift baselines are reset).

Serving switches first and the registry records the change only after Triton
confirmed the new version ready, so the registry never says "live" about a
version that is not being served. Other replicas on the same registry database
follow (`follow`, run by the plane each ai.registry.poll_interval_s when the
registry's generation changed): each loads the version into its own Triton
from the artifact stored in the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np

from ai_plane import training
from ai_plane.engine import AiEngine
from ai_plane.registry import ModelRecord, ModelState, Registry
from ai_plane.scorer import LiveModel
from ai_plane.triton import MODEL_PY, ModelRepository, model_config_json
from ai_plane.triton_grpc import TritonClient
from triplane.runtime.config import AiConfig
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger("triplane.ai.models")


def train_into(
    registry: Registry, config: AiConfig, datasets_dir: Path, model: str, seed: int = 0
) -> tuple[ModelRecord, bool]:
    """Trains `model` on its dataset for generator seed `seed` (0: the
    configured one) under `datasets_dir`, and registers a draft. Deterministic:
    the same dataset and seed give the same artifact, so the same version."""
    if model not in training.MODEL_FEATURES:
        raise InvalidArgument("UNKNOWN_MODEL", f"unknown model {model!r}", "model")
    models = config.models
    seed = seed or models.seed
    dataset = training.load_dataset(datasets_dir, model, seed)
    trained = training.fit(dataset, seed, models.num_boost_round, models.num_leaves)
    metrics = {
        "roc_auc": trained.roc_auc,
        "pr_auc": trained.pr_auc,
        "positive_rate": trained.positive_rate,
    }
    return registry.register(
        model,
        trained.booster_text,
        training.lineage(trained, dataset),
        metrics,
        list(trained.feature_names),
        trained.baselines,
    )


def make_live(registry: Registry, record: ModelRecord) -> ModelRecord:
    """Moves a draft or approved version to live (for bootstrap: the plane
    that serves it loads it when it starts). Replicas bootstrapping one shared
    registry at once may each find `record` moved on by another: each goes on
    from the stored state, and a version already live is left as it is."""
    for _ in range(3):
        try:
            if record.state is ModelState.DRAFT:
                record = registry.transition(record.model, record.version, ModelState.APPROVED)
            if record.state is not ModelState.LIVE:
                record = registry.transition(record.model, record.version, ModelState.LIVE)
            return record
        except FailedPrecondition:
            registry.reload()
            record = registry.get(record.model, record.version)
            if record.state is ModelState.LIVE:
                return record
    return registry.transition(record.model, record.version, ModelState.LIVE)


def write_live_repository(
    registry: Registry, repository: ModelRepository, config: AiConfig
) -> None:
    """The model repository our own Triton starts from: every live version."""
    for model in training.MODEL_FEATURES:
        live = registry.live(model)
        if live is None:
            continue
        repository.write_version(model, live.version, registry.artifact_text(model, live.version))
        repository.write_config(model, [live.version], len(live.feature_names), config.triton)


@dataclass
class ModelManager:
    config: AiConfig
    registry: Registry
    engine: AiEngine
    triton: TritonClient | None
    repository: ModelRepository | None
    # Where TrainModel finds its datasets (written by `triplane ai datasets`).
    datasets_dir: Path
    _lock: asyncio.Lock | None = None
    _serving_changed: asyncio.Condition | None = None

    def _serialize(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _changed(self) -> asyncio.Condition:
        if self._serving_changed is None:
            self._serving_changed = asyncio.Condition()
        return self._serving_changed

    def activate_in_process(self, record: ModelRecord) -> None:
        text = self.registry.artifact_text(record.model, record.version)
        booster = lgb.Booster(model_str=text)
        self.engine.scorer.set_live(
            LiveModel(record.model, record.version, booster, tuple(record.feature_names))
        )
        self.engine.set_drift_baselines(record.model, record.version, record.baselines)

    def serving_version(self, model: str) -> int:
        """The version this replica's scorer serves (0: none)."""
        live = self.engine.scorer.models.get(model)
        return live.version if live is not None else 0

    async def wait_serving(self, model: str, version: int) -> None:
        """Returns once this replica serves `version` of `model` (Triton
        loaded and warm, the in-process copy swapped)."""
        changed = self._changed()
        async with changed:
            await changed.wait_for(lambda: self.serving_version(model) == version)

    async def follow(self) -> list[ModelRecord]:
        """Makes this replica serve every live version of the stored registry
        it does not serve yet (promoted or rolled back by another replica, or
        by the CLI): loads it into this replica's own Triton from the
        registry's artifact, then switches the scorer. Returns what switched."""
        switched: list[ModelRecord] = []
        async with self._serialize():
            await asyncio.to_thread(self.registry.reload)
            for model in training.MODEL_FEATURES:
                live = self.registry.live(model)
                if live is None or self.serving_version(model) == live.version:
                    continue
                await self.activate(live)
                log.info("following the registry: %s v%d is live here now", model, live.version)
                switched.append(live)
        return switched

    async def _load_in_triton(self, record: ModelRecord) -> None:
        if self.triton is None:
            return
        triton = self.config.triton
        text = self.registry.artifact_text(record.model, record.version)
        n_features = len(record.feature_names)
        try:
            if self.repository is not None:
                self.repository.write_version(record.model, record.version, text)
                self.repository.write_config(record.model, [record.version], n_features, triton)
                await self.triton.load(record.model, triton.load_timeout_s)
            else:
                await self._load_remote(record, text)
            ready = await self.triton.ready(record.model, record.version, triton.load_timeout_s)
        except Exception as error:
            raise Unavailable(
                "TRITON_LOAD_FAILED",
                f"Triton could not load {record.model} v{record.version}: {error}",
            ) from error
        if not ready:
            raise Unavailable(
                "TRITON_LOAD_FAILED", f"{record.model} v{record.version} is not ready"
            )

    async def _load_remote(self, record: ModelRecord, text: str) -> None:
        """An external Triton gets the files in the load request itself."""
        assert self.triton is not None
        config_json = model_config_json(
            record.model, [record.version], len(record.feature_names), self.config.triton
        )
        files = {
            f"file:{record.version}/model.txt": text.encode(),
            f"file:{record.version}/model.py": MODEL_PY.read_bytes(),
        }
        await self.triton.load(record.model, self.config.triton.load_timeout_s, config_json, files)

    async def warm_up(self, record: ModelRecord) -> None:
        """One real inference before traffic: a Python-backend model's first
        request pays for lazy initialisation, which must not hit a caller's
        budget (nor count against the circuit breaker)."""
        if self.triton is None:
            return
        rows = np.zeros((1, len(record.feature_names)), dtype=np.float64)
        try:
            timeout_s = self.config.triton.load_timeout_s
            # Its own queue timeout too: the first request may wait on lazy init.
            await self.triton.infer(
                record.model, record.version, rows, timeout_s, int(timeout_s * 1e6)
            )
        except Exception as error:
            raise Unavailable(
                "TRITON_LOAD_FAILED",
                f"{record.model} v{record.version} failed its warm-up: {error}",
            ) from error

    async def activate(self, record: ModelRecord) -> None:
        await self._load_in_triton(record)
        await self.warm_up(record)
        self.activate_in_process(record)
        changed = self._changed()
        async with changed:
            changed.notify_all()

    async def train(self, model: str, seed: int) -> tuple[ModelRecord, bool]:
        async with self._serialize():
            await asyncio.to_thread(self.registry.reload)
            return await asyncio.to_thread(
                train_into, self.registry, self.config, self.datasets_dir, model, seed
            )

    async def promote(
        self, model: str, version: int, target: ModelState, actor: str = "", reason: str = ""
    ) -> ModelRecord:
        async with self._serialize():
            await asyncio.to_thread(self.registry.reload)
            record = self.registry.check_transition(model, version, target)
            if target is ModelState.LIVE:
                await self.activate(record)
            return await asyncio.to_thread(
                self.registry.transition, model, version, target, actor, reason
            )

    async def flush_drift(self) -> int:
        """Writes this replica's new drift points to the registry's shared
        history (run every ai.drift.history_flush_s and at stop); a failed
        write keeps them for the next. Returns the points written."""
        points = self.engine.take_drift_points()
        if not points:
            return 0
        try:
            await asyncio.to_thread(
                self.registry.record_drift, points, self.config.drift.history_points
            )
        except BaseException:
            self.engine.keep_drift_points(points)
            raise
        return len(points)

    async def drift_history(self, model: str, version: int) -> dict[str, list[tuple[int, float]]]:
        """A version's drift history per series, oldest first: what any
        replica wrote to the registry, with this replica's points not yet
        written (the same slot: this replica's newer value)."""
        stored = await asyncio.to_thread(self.registry.drift_history, model, version)
        slots = {
            series: {p.slot: (p.at_us, p.psi) for p in points} for series, points in stored.items()
        }
        for point in self.engine.pending_drift(model, version):
            slots.setdefault(point.series, {})[point.slot] = (point.at_us, point.psi)
        keep = self.config.drift.history_points
        return {
            series: [by_slot[slot] for slot in sorted(by_slot)[-keep:]]
            for series, by_slot in slots.items()
        }

    async def rollback(
        self, model: str, actor: str = "", reason: str = ""
    ) -> tuple[ModelRecord, float]:
        """Makes the rollback pointer live; returns it and the seconds taken
        until Triton served it."""
        async with self._serialize():
            started = time.monotonic()
            await asyncio.to_thread(self.registry.reload)
            _, target = self.registry.rollback_target(model)
            await self.activate(target)
            record = await asyncio.to_thread(self.registry.rollback, model, actor, reason)
            return record, time.monotonic() - started
