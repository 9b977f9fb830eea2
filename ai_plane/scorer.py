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
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge

from ai_plane.breaker import CircuitBreaker
from ai_plane.triton_http import TritonHttpUnavailable
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


class TritonInference(Protocol):
    """What scoring needs from a Triton client (`ai_plane.triton_grpc.TritonClient`)."""

    async def infer(
        self, model: str, version: int, rows: FloatArray, timeout_s: float, queue_timeout_us: int
    ) -> tuple[FloatArray, FloatArray]: ...

    async def close(self) -> None: ...


def failure_reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):  # our own client timeout (HTTP path)
        return "TRITON_TIMEOUT"
    if isinstance(error, TritonHttpUnavailable):
        return "TRITON_UNAVAILABLE"
    status = ""
    # grpc.aio.AioRpcError has code(); tritonclient's exceptions have status().
    for attribute in ("code", "status"):
        status_fn = getattr(error, attribute, None)
        if callable(status_fn):
            status = str(status_fn() or "")
            break
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
        triton: TritonInference | None,
        breaker: CircuitBreaker,
        clock: Clock,
    ) -> None:
        self._config = config
        self.triton = triton
        self.breaker = breaker
        self._clock = clock
        self.models: dict[str, LiveModel] = {}
        self._last_good: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        # Counter children by (model, source): labels() costs a lock and a
        # tuple lookup per call, and these are few and fixed.
        self._counters: dict[tuple[str, str], Any] = {}

    def _count(self, model_name: str, source: str) -> None:
        counter = self._counters.get((model_name, source))
        if counter is None:
            counter = SCORES.labels(model=model_name, source=source)
            self._counters[(model_name, source)] = counter
        counter.inc()

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
        self._count(model_name, result.source)
        if not self._config.fallback.last_good:
            return result
        now_us = self._clock.now_us()
        bound = self._config.fallback.last_good_max_entries
        last_good = self._last_good
        for key, score in zip(entity_keys, result.scores.tolist(), strict=True):
            entry = f"{model_name}|{key}"
            last_good[entry] = (score, result.version, now_us)
            last_good.move_to_end(entry)
        while len(last_good) > bound:
            last_good.popitem(last=False)
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
                self._count(model_name, SOURCE_LAST_GOOD)
                last_version = max(f[1] for f in found if f is not None)
                return ScoreResult(scores, None, SOURCE_LAST_GOOD, last_version, reason)
        self._count(model_name, SOURCE_NONE)
        nan = np.full(len(entity_keys), math.nan)
        return ScoreResult(nan, None, SOURCE_NONE, version, reason)

    async def close(self) -> None:
        if self.triton is not None:
            await self.triton.close()
