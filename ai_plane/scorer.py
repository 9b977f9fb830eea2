"""Scoring with a hard time budget: Triton first, then the fallback chain.

1. Triton over gRPC, with client_timeout = the smaller of the Triton budget and
   the caller's remaining deadline minus this plane's own budget, and a
   server-side queue timeout no longer than that (Triton rejects a request
   that waited past it instead of answering late). A circuit breaker skips
   Triton while it keeps failing.
2. The same model version evaluated in-process (LightGBM in this process).
3. The last good score of the same entity, while it is fresh enough.
4. An explicit "none": the caller (policy_plane) has a rule for that.

Every result says its source, so a decision records where its score came from.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge

from ai_plane.breaker import CircuitBreaker
from triplane.runtime.clock import Clock
from triplane.runtime.config import AiConfig
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import DeadlineExceeded

log = logging.getLogger("triplane.ai.scorer")

FloatArray = npt.NDArray[np.float64]

SOURCE_TRITON, SOURCE_IN_PROCESS, SOURCE_LAST_GOOD, SOURCE_NONE = (
    "triton",
    "in_process",
    "last_good",
    "none",
)

SCORES = Counter("triplane_ai_scores_total", "Scores answered, by source", ["model", "source"])
BREAKER_STATE = Gauge("triplane_ai_breaker_state", "Triton circuit: 0 closed, 1 open, 2 half-open")


@dataclass(frozen=True)
class LiveModel:
    name: str
    version: int
    booster: lgb.Booster
    feature_names: tuple[str, ...]


@dataclass(frozen=True)
class ScoreResult:
    scores: FloatArray
    # TreeSHAP contributions per row (features then bias); None without a model run.
    contributions: FloatArray | None
    source: str
    version: int
    fallback_reason: str = ""


def sigmoid(raw: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-raw)), dtype=np.float64)


def predict_in_process(booster: lgb.Booster, rows: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(scores, contributions), computed exactly as the Triton model does."""
    contributions = np.asarray(
        booster.predict(rows, pred_contrib=True, num_threads=1), dtype=np.float64
    )
    return sigmoid(contributions.sum(axis=1)), contributions


class TritonClient:
    """The async tritonclient, reduced to what the plane needs."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc.aio as triton_aio

        self._module: Any = triton_aio
        self._client: Any = triton_aio.InferenceServerClient(url)
        self.url = url

    async def infer(
        self, model: str, version: int, rows: FloatArray, timeout_s: float, queue_timeout_us: int
    ) -> tuple[FloatArray, FloatArray]:
        data = rows.astype(np.float32)
        features = self._module.InferInput("FEATURES", list(data.shape), "FP32")
        features.set_data_from_numpy(data)
        result = await self._client.infer(
            model,
            [features],
            model_version=str(version),
            client_timeout=timeout_s,
            # 0: Triton's configured queue timeout applies.
            timeout=queue_timeout_us or None,
        )
        scores = np.asarray(result.as_numpy("SCORE"), dtype=np.float64).reshape(-1)
        contributions = np.asarray(result.as_numpy("CONTRIB"), dtype=np.float64)
        return scores, contributions

    async def load(
        self,
        model: str,
        timeout_s: float,
        config: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        await self._client.load_model(model, config=config, files=files, client_timeout=timeout_s)

    async def ready(self, model: str, version: int, timeout_s: float) -> bool:
        ready: bool = await self._client.is_model_ready(
            model, str(version), client_timeout=timeout_s
        )
        return ready

    async def warm_up(self, timeout_s: float) -> bool:
        """Opens the connection now, so the first score does not pay for it."""
        try:
            live: bool = await self._client.is_server_live(client_timeout=timeout_s)
        except Exception:
            return False
        return live

    async def close(self) -> None:
        await self._client.close()


def failure_reason(error: BaseException) -> str:
    status = ""
    status_fn = getattr(error, "status", None)
    if callable(status_fn):
        status = str(status_fn() or "")
    text = f"{status} {error}".upper()
    if "DEADLINE_EXCEEDED" in text:
        return "TRITON_TIMEOUT"
    if "TIMEOUT EXPIRED" in text or "EXCEEDS MAXIMUM QUEUE SIZE" in text:
        return "TRITON_REJECTED"
    if "UNAVAILABLE" in text:
        return "TRITON_UNAVAILABLE"
    return "TRITON_ERROR"


class Scorer:
    def __init__(
        self,
        config: AiConfig,
        triton: TritonClient | None,
        breaker: CircuitBreaker,
        clock: Clock,
    ) -> None:
        self._config = config
        self.triton = triton
        self.breaker = breaker
        self._clock = clock
        self.models: dict[str, LiveModel] = {}
        self._last_good: OrderedDict[str, tuple[float, int, int]] = OrderedDict()

    def set_live(self, model: LiveModel) -> None:
        self.models[model.name] = model

    async def score(
        self, model_name: str, rows: FloatArray, entity_keys: list[str], deadline: Deadline
    ) -> ScoreResult:
        """Scores `rows` (one per entity key) with the first source that answers."""
        model = self.models.get(model_name)
        if model is None:
            return self._last_good_or_none(model_name, entity_keys, 0, "NO_LIVE_MODEL")
        reason = await self._triton_or_reason(model, rows, deadline)
        if isinstance(reason, ScoreResult):
            return self._remember(model_name, entity_keys, reason)
        if self._config.fallback.in_process:
            scores, contributions = predict_in_process(model.booster, rows)
            result = ScoreResult(scores, contributions, SOURCE_IN_PROCESS, model.version, reason)
            return self._remember(model_name, entity_keys, result)
        return self._last_good_or_none(model_name, entity_keys, model.version, reason)

    async def _triton_or_reason(
        self, model: LiveModel, rows: FloatArray, deadline: Deadline
    ) -> ScoreResult | str:
        if self.triton is None:
            return "NO_TRITON"
        if not self.breaker.allow():
            BREAKER_STATE.set(int(self.breaker.state))
            return "CIRCUIT_OPEN"
        triton = self._config.triton
        try:
            timeout_s = deadline.for_next_hop(self._config.budget_ms, triton.score_timeout_ms)
        except DeadlineExceeded:
            # Not Triton's fault: give back a half-open probe without judging it.
            self.breaker.release()
            return "DEADLINE_TOO_SHORT"
        queue_timeout_us = max(1, min(triton.queue_timeout_us, int(timeout_s * 1e6)))
        try:
            scores, contributions = await self.triton.infer(
                model.name, model.version, rows, timeout_s, queue_timeout_us
            )
        except Exception as error:
            self.breaker.record_failure()
            BREAKER_STATE.set(int(self.breaker.state))
            reason = failure_reason(error)
            log.debug("triton call failed: %s", reason)
            return reason
        self.breaker.record_success()
        BREAKER_STATE.set(0)
        return ScoreResult(scores, contributions, SOURCE_TRITON, model.version)

    def _remember(
        self, model_name: str, entity_keys: list[str], result: ScoreResult
    ) -> ScoreResult:
        SCORES.labels(model=model_name, source=result.source).inc()
        if not self._config.fallback.last_good:
            return result
        now_us = self._clock.now_us()
        bound = self._config.fallback.last_good_max_entries
        for key, score in zip(entity_keys, result.scores.tolist(), strict=True):
            self._last_good[f"{model_name}|{key}"] = (score, result.version, now_us)
            self._last_good.move_to_end(f"{model_name}|{key}")
        while len(self._last_good) > bound:
            self._last_good.popitem(last=False)
        return result

    def _last_good_or_none(
        self, model_name: str, entity_keys: list[str], version: int, reason: str
    ) -> ScoreResult:
        fallback = self._config.fallback
        if fallback.last_good:
            oldest_us = self._clock.now_us() - fallback.last_good_ttl_s * 1_000_000
            found = [self._last_good.get(f"{model_name}|{key}") for key in entity_keys]
            if all(f is not None and f[2] >= oldest_us for f in found):
                scores = np.array([f[0] for f in found if f is not None], dtype=np.float64)
                SCORES.labels(model=model_name, source=SOURCE_LAST_GOOD).inc()
                last_version = max(f[1] for f in found if f is not None)
                return ScoreResult(scores, None, SOURCE_LAST_GOOD, last_version, reason)
        SCORES.labels(model=model_name, source=SOURCE_NONE).inc()
        nan = np.full(len(entity_keys), math.nan)
        return ScoreResult(nan, None, SOURCE_NONE, version, reason)

    async def close(self) -> None:
        if self.triton is not None:
            await self.triton.close()
