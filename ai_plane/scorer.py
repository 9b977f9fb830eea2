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
from ai_plane.triton_http import TritonHttpInfer, TritonHttpUnavailable
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
    """Triton over gRPC, reduced to what the plane needs.

    Inference goes straight through the generated gRPC stub on a channel of
    its own: the request is assembled from prebuilt parts (model, version,
    input tensor description per row count), the rows travel as one raw FP32
    buffer and the outputs are read with `np.frombuffer`. tritonclient's
    wrapper objects (InferInput, InferResult, the per-call request builder)
    cost more CPU per call than the rest of the call's Python together.
    Model control (load, readiness, liveness) stays on tritonclient's aio
    client: it is off the hot path.
    """

    def __init__(self, url: str, http_url: str = "") -> None:
        import grpc
        import tritonclient.grpc.aio as triton_aio
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb: Any = service_pb2
        self._client: Any = triton_aio.InferenceServerClient(url)
        self._channel: Any = grpc.aio.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        self._infer: Any = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer
        # (rows, columns) -> the FEATURES tensor description.
        self._inputs: dict[tuple[int, int], Any] = {}
        self.url = url
        # The same Triton's HTTP endpoint, when known: inference goes there
        # (a third of the CPU of a grpc.aio call here; see triton_http.py).
        self.http: TritonHttpInfer | None = TritonHttpInfer(http_url) if http_url else None

    def _input(self, shape: tuple[int, int]) -> Any:
        tensor = self._inputs.get(shape)
        if tensor is None:
            tensor = self._pb.ModelInferRequest.InferInputTensor(
                name="FEATURES", datatype="FP32", shape=list(shape)
            )
            self._inputs[shape] = tensor
        return tensor

    async def infer(
        self, model: str, version: int, rows: FloatArray, timeout_s: float, queue_timeout_us: int
    ) -> tuple[FloatArray, FloatArray]:
        if self.http is not None:
            return await self.http.infer(model, version, rows, timeout_s, queue_timeout_us)
        data = np.ascontiguousarray(rows, dtype=np.float32)
        request = self._pb.ModelInferRequest(
            model_name=model,
            model_version=str(version),
            inputs=[self._input((data.shape[0], data.shape[1]))],
            raw_input_contents=[data.tobytes()],
        )
        if queue_timeout_us:  # 0: Triton's configured queue timeout applies
            request.parameters["timeout"].int64_param = queue_timeout_us
        response = await self._infer(request, timeout=timeout_s)
        return _outputs(response, data.shape[0])

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
        """Opens both connections now, so the first score does not pay for it."""
        try:
            live: bool = await self._client.is_server_live(client_timeout=timeout_s)
            await self._channel.channel_ready()
        except Exception:
            return False
        return live

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self._client.close()
        await self._channel.close()


_MAX_MESSAGE_BYTES = 2**31 - 1


def _outputs(response: Any, n_rows: int) -> tuple[FloatArray, FloatArray]:
    """(SCORE per row, CONTRIB rows) of a ModelInferResponse with raw outputs."""
    raw = response.raw_output_contents
    found: dict[str, bytes] = {o.name: raw[i] for i, o in enumerate(response.outputs)}
    scores = np.frombuffer(found["SCORE"], dtype=np.float32).astype(np.float64)
    contributions = np.frombuffer(found["CONTRIB"], dtype=np.float32).astype(np.float64)
    return scores, contributions.reshape(n_rows, -1)


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
