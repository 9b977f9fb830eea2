"""What the bandit learns from, shared by every AI plane replica.

Pending rankings: Rank stores, per rank id, the tenant and the features of
each ranked offer; ReportOutcome (on any replica) reads them. In process for
one replica, in Redis (with a TTL) for several (ai.bandit.pending_store).

Outcomes on the spine (ai.bandit.outcomes spine): ReportOutcome publishes the
outcome (arm, features, reward) on TRIPLANE_AI as
`triplane.ai.<tenant>.bandit.outcome`, its outcome id the JetStream message id.
Every replica reads the whole subject with an ordered consumer of its own (not
a shared durable: each posterior must see every outcome) and applies each
outcome id once, in stream order, so replicas that read the same stream hold
the same posterior. ReportOutcome answers once its own replica applied it.

Snapshots: every ai.bandit.snapshot_interval_s and at shutdown the posterior,
the outcome ids remembered for dedupe and the stream sequence they cover go to
the NATS object store (bucket triplane-ai-bandit); a replica starting loads
the newest and replays the outcomes after its sequence. A restart therefore
replays at most the outcomes of one snapshot interval (plus whatever arrived
while it was down); without a snapshot, the whole stream (bounded by
nats.streams.ai.max_age_s / max_bytes: outcomes aged out of the stream before
any snapshot covered them are lost to a fresh replica).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, ObjectMeta
from nats.js.object_store import ObjectStore

from ai_plane.bandit import FloatArray, LinearThompsonBandit
from triplane.common.v1 import envelope_pb2
from triplane.runtime import bus
from triplane.runtime.config import AiConfig, NatsConfig, pending_store
from triplane.runtime.errors import Unavailable
from triplane.runtime.tasks import every

log = logging.getLogger("triplane.ai.outcomes")

OUTCOME_EVENT = "ai.bandit.outcome"
OUTCOME_FILTER = "triplane.ai.*.bandit.outcome"
AI_STREAM = "TRIPLANE_AI"
SNAPSHOT_BUCKET = "triplane-ai-bandit"


@dataclass(frozen=True)
class PendingRank:
    tenant_id: str
    # offer id -> the bandit features of that offer in this ranking.
    features: dict[str, FloatArray]
    # The contextual learner's ranking (ai.learner.engine vw): the
    # LearnerExposure serialized, and each arm's lever (same order).
    exposure: bytes = b""
    levers: tuple[float, ...] = ()


class PendingRanks(Protocol):
    async def put(self, rank_id: str, pending: PendingRank, due_us: int = 0) -> None:
        """Keeps the ranking; due_us > 0 also enters it in the reward window
        sweep (due() returns it once due_us has passed, until settled)."""

    async def get(self, rank_id: str) -> PendingRank | None: ...
    async def due(self, now_us: int, limit: int) -> list[str]:
        """Rankings whose window closed by now_us and are not settled yet."""

    async def settle(self, rank_id: str) -> None:
        """Takes the ranking out of the sweep (its reward is on the spine)."""

    async def claim_sweep(self, owner: str, ttl_ms: int) -> bool:
        """Whether this replica sweeps now: one at a time in the usual case
        (a sweep by two at once is still counted once, only wasted)."""

    async def close(self) -> None: ...


class InProcessPendingRanks:
    """One replica's own: the newest max_entries rankings."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._pending: OrderedDict[str, PendingRank] = OrderedDict()
        self._due: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    async def put(self, rank_id: str, pending: PendingRank, due_us: int = 0) -> None:
        self._pending[rank_id] = pending
        if due_us > 0:
            self._due[rank_id] = due_us
            heapq.heappush(self._heap, (due_us, rank_id))
        while len(self._pending) > self._max:
            dropped, _ = self._pending.popitem(last=False)
            self._due.pop(dropped, None)

    async def get(self, rank_id: str) -> PendingRank | None:
        return self._pending.get(rank_id)

    async def due(self, now_us: int, limit: int) -> list[str]:
        found: list[str] = []
        while self._heap and self._heap[0][0] <= now_us and len(found) < limit:
            due_us, rank_id = heapq.heappop(self._heap)
            if self._due.get(rank_id) == due_us:
                found.append(rank_id)
        # Back in the heap until settled: a sweep whose publish failed retries.
        for rank_id in found:
            heapq.heappush(self._heap, (self._due[rank_id], rank_id))
        return found

    async def claim_sweep(self, owner: str, ttl_ms: int) -> bool:
        return True

    async def settle(self, rank_id: str) -> None:
        self._due.pop(rank_id, None)
        # Entries left in the heap are skipped by due(); drop them when the
        # heap holds mostly settled ones.
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._heap = [(d, r) for d, r in self._heap if self._due.get(r) == d]
            heapq.heapify(self._heap)

    async def close(self) -> None:
        return None


def _encode_pending(pending: PendingRank) -> str:
    # JSON writes a float as its shortest round-tripping repr: the features
    # read back are bit for bit the ones ranked.
    features = {offer: [float(v) for v in x] for offer, x in pending.features.items()}
    data: dict[str, object] = {"t": pending.tenant_id, "f": features}
    if pending.exposure:
        data["e"] = base64.b64encode(pending.exposure).decode()
        data["l"] = list(pending.levers)
    return json.dumps(data, separators=(",", ":"))


def _decode_pending(text: str | bytes) -> PendingRank:
    data = json.loads(text)
    features = {o: np.asarray(x, dtype=np.float64) for o, x in data["f"].items()}
    exposure = base64.b64decode(data["e"]) if "e" in data else b""
    return PendingRank(data["t"], features, exposure, tuple(data.get("l", ())))


class RedisPendingRanks:
    """Shared by every replica: one key per ranking, expiring after ttl_s."""

    def __init__(self, url: str, prefix: str, ttl_s: int) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url)
        self._prefix = f"{prefix}:bandit:rank:"
        # Rankings awaiting a reward, scored by when their window closes.
        self._due_key = f"{prefix}:bandit:due"
        self._ttl_s = ttl_s

    async def put(self, rank_id: str, pending: PendingRank, due_us: int = 0) -> None:
        if due_us <= 0:
            await self._redis.set(self._prefix + rank_id, _encode_pending(pending), ex=self._ttl_s)
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._prefix + rank_id, _encode_pending(pending), ex=self._ttl_s)
            pipe.zadd(self._due_key, {rank_id: due_us})
            await pipe.execute()

    async def get(self, rank_id: str) -> PendingRank | None:
        text = await self._redis.get(self._prefix + rank_id)
        return None if text is None else _decode_pending(text)

    async def due(self, now_us: int, limit: int) -> list[str]:
        found = await self._redis.zrangebyscore(self._due_key, "-inf", now_us, start=0, num=limit)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in found]

    async def settle(self, rank_id: str) -> None:
        await self._redis.zrem(self._due_key, rank_id)

    async def claim_sweep(self, owner: str, ttl_ms: int) -> bool:
        claimed = await self._redis.set(self._due_key + ":sweeper", owner, nx=True, px=ttl_ms)
        return bool(claimed)

    async def close(self) -> None:
        await self._redis.aclose()


def build_pending(ai: AiConfig) -> PendingRanks:
    if pending_store(ai) == "redis":
        url = ai.bandit.pending_redis_url or ai.features.redis_url
        return RedisPendingRanks(url, ai.features.namespace, ai.bandit.pending_ttl_s)
    return InProcessPendingRanks(ai.bandit.max_pending_ranks)


@dataclass(frozen=True)
class Outcome:
    outcome_id: str
    tenant_id: str
    arm_id: str
    x: FloatArray
    reward: float

    @property
    def key(self) -> str:
        """What dedupes it: outcome ids are the caller's, unique per tenant
        only, so another tenant's equal id is another outcome."""
        return outcome_key(self.tenant_id, self.outcome_id)


def outcome_key(tenant_id: str, outcome_id: str) -> str:
    return f"{tenant_id}|{outcome_id}"


class BanditLearner:
    """The bandit with what it learned from: outcome ids applied (dedupe, the
    newest max_outcome_ids) and the stream sequence applied up to."""

    event_type = OUTCOME_EVENT
    subject_filter = OUTCOME_FILTER
    snapshot_suffix = "posterior"

    def __init__(self, bandit: LinearThompsonBandit, max_outcome_ids: int) -> None:
        self.bandit = bandit
        self._max_ids = max_outcome_ids
        # outcome id -> stream sequence it was applied at (0: applied locally).
        self._applied: OrderedDict[str, int] = OrderedDict()
        self.sequence = 0
        self._moved = asyncio.Event()

    def seen(self, key: str) -> bool:
        """Whether the outcome of this key (outcome_key) was applied."""
        return key in self._applied

    def applied_at(self, key: str) -> int | None:
        return self._applied.get(key)

    def apply_message(self, data: bytes, sequence: int) -> None:
        self.apply(_decode_outcome(data), sequence)

    def apply(self, outcome: Outcome, sequence: int = 0) -> bool:
        """Updates the posterior once per outcome id; False for a repeat."""
        if sequence:
            self.sequence = max(self.sequence, sequence)
        fresh = outcome.key not in self._applied
        if fresh:
            self.bandit.update(outcome.arm_id, outcome.x, outcome.reward)
            self._applied[outcome.key] = sequence
            while len(self._applied) > self._max_ids:
                self._applied.popitem(last=False)
        if sequence:
            self._moved.set()
            self._moved = asyncio.Event()
        return fresh

    async def wait_for(self, sequence: int) -> None:
        """Returns once the stream is applied through `sequence`."""
        while self.sequence < sequence:
            await self._moved.wait()

    def capture(self) -> dict[str, npt.NDArray[np.generic]]:
        """A copy of everything a snapshot holds, taken between two outcomes
        (on the event loop); encode() may then run in a worker thread."""
        return {
            "sequence": np.asarray(self.sequence, dtype=np.int64),
            "outcome_ids": np.asarray(list(self._applied), dtype=np.str_),
            "outcome_sequences": np.asarray(list(self._applied.values()), dtype=np.int64),
            **self.bandit.state(),
        }

    @staticmethod
    def encode(captured: dict[str, npt.NDArray[np.generic]]) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **captured)
        return buffer.getvalue()

    def snapshot(self) -> bytes:
        return self.encode(self.capture())

    def restore(self, data: bytes) -> None:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            state = {key: saved[key] for key in ("arm_ids", "precision", "weighted", "updates")}
            self.bandit.load_state(state)
            ids = saved["outcome_ids"].tolist()
            sequences = saved["outcome_sequences"].tolist()
            self._applied = OrderedDict(zip(ids, (int(s) for s in sequences), strict=True))
            self.sequence = int(saved["sequence"])


def _encode_outcome(outcome: Outcome, occurred_at_us: int) -> bytes:
    payload = struct_pb2.Struct()
    payload.update({"arm_id": outcome.arm_id, "reward": float(outcome.reward)})
    payload["x"] = [float(v) for v in outcome.x]
    envelope = bus.make_envelope(
        event_type=OUTCOME_EVENT,
        tenant_id=outcome.tenant_id,
        payload=payload,
        occurred_at_us=occurred_at_us,
        event_id=outcome.outcome_id,
    )
    return envelope.SerializeToString()


def _decode_outcome(data: bytes) -> Outcome:
    envelope = envelope_pb2.EventEnvelope.FromString(data)
    payload = struct_pb2.Struct.FromString(envelope.payload)
    fields = payload.fields
    x = np.asarray([v.number_value for v in fields["x"].list_value.values], dtype=np.float64)
    return Outcome(
        envelope.event_id,
        envelope.tenant_id,
        fields["arm_id"].string_value,
        x,
        fields["reward"].number_value,
    )


class SpineLearner(Protocol):
    """What the spine feeds: the Thompson bandit's BanditLearner, or the
    contextual learner's RewardLearner (ai_plane/learner.py)."""

    event_type: str
    subject_filter: str
    snapshot_suffix: str
    sequence: int

    def seen(self, key: str) -> bool: ...
    def applied_at(self, key: str) -> int | None: ...
    def apply_message(self, data: bytes, sequence: int) -> None: ...
    async def wait_for(self, sequence: int) -> None: ...
    def capture(self) -> dict[str, npt.NDArray[np.generic]]: ...
    @staticmethod
    def encode(captured: dict[str, npt.NDArray[np.generic]]) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


class OutcomeSpine:
    """Publishes outcomes on TRIPLANE_AI and applies every one of them here."""

    def __init__(
        self,
        js: JetStreamContext,
        nats: NatsConfig,
        ai: AiConfig,
        learner: SpineLearner,
        now_us: object,
    ) -> None:
        self._js = js
        self._nats = nats
        self._ai = ai
        self.learner = learner
        self._now_us = now_us
        self._name = f"{ai.features.namespace}.{learner.snapshot_suffix}"
        self._sub: object | None = None
        self._snapshotter: asyncio.Task[None] | None = None
        self._snapshotted = -1
        # The stream sequence of the snapshot this replica started from.
        self.resumed_from: int | None = None
        self.unreadable = 0

    async def start(self) -> None:
        await bus.ensure_streams(self._js, self._nats, [AI_STREAM])
        self._store = await self._object_store()
        await self._load_snapshot()
        start = self.learner.sequence + 1
        self._sub = await self._js.subscribe(
            self.learner.subject_filter,
            stream=AI_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        interval = self._ai.bandit.snapshot_interval_s
        if interval > 0:
            self._snapshotter = asyncio.create_task(self._snapshots(interval))

    async def _object_store(self) -> ObjectStore:
        try:
            return await self._js.object_store(SNAPSHOT_BUCKET)
        except Exception:
            return await self._js.create_object_store(SNAPSHOT_BUCKET)

    async def _load_snapshot(self) -> None:
        try:
            found = await self._store.get(self._name)
        except Exception as error:  # not found, or none yet
            log.info("no bandit snapshot to resume from (%r): learning from the stream", error)
            return
        if not found.data:
            return
        self.learner.restore(found.data)
        self._snapshotted = self.resumed_from = self.learner.sequence
        log.info("bandit resumed from its snapshot at stream sequence %d", self.learner.sequence)

    async def _on_message(self, message) -> None:  # type: ignore[no-untyped-def]
        sequence = message.metadata.sequence.stream
        try:
            self.learner.apply_message(message.data, sequence)
        except Exception:
            self.unreadable += 1
            log.warning("unreadable learner outcome at stream sequence %d skipped", sequence)
            self.learner.sequence = max(self.learner.sequence, sequence)

    async def report(self, outcome: Outcome) -> bool:
        """Publishes the outcome and waits until this replica applied it;
        True when this report taught the bandit, False for a repeat."""
        if self.learner.seen(outcome.key):
            return False
        data = _encode_outcome(outcome, self._now_us())  # type: ignore[operator]
        return await self.publish(outcome.key, outcome.tenant_id, data)

    async def publish(self, key: str, tenant_id: str, data: bytes) -> bool:
        """Publishes one outcome message (key: its dedupe id) and waits until
        this replica applied it; True when this publish was applied here."""
        subject = bus.subject_for(self.learner.event_type, tenant_id)
        timeout_s = self._ai.bandit.apply_timeout_s
        try:
            ack = await self._js.publish(
                subject,
                data,
                timeout=self._nats.publish_timeout_s,
                stream=AI_STREAM,
                # JetStream dedupes ids across the whole stream: the key.
                headers={"Nats-Msg-Id": key},
            )
            await asyncio.wait_for(self.learner.wait_for(ack.seq), timeout_s)
        except Exception as error:
            raise Unavailable(
                "OUTCOME_NOT_APPLIED", f"the outcome could not go through the spine: {error!r}"
            ) from error
        return not ack.duplicate and self.learner.applied_at(key) == ack.seq

    async def snapshot(self) -> bool:
        """Stores the posterior if it moved since the last snapshot."""
        if self.learner.sequence == self._snapshotted:
            return False
        sequence = self.learner.sequence
        with contextlib.suppress(Exception):  # none stored yet
            stored = await self._store.get_info(self._name)
            if stored.description and int(stored.description) >= sequence:
                # Another replica stored one at least as far along: keep it
                # (every replica's posterior at a sequence is the same).
                self._snapshotted = sequence
                return False
        captured = self.learner.capture()
        data = await asyncio.to_thread(self.learner.encode, captured)
        await self._store.put(
            self._name, data, meta=ObjectMeta(name=self._name, description=str(sequence))
        )
        self._snapshotted = sequence
        return True

    async def _snapshots(self, interval: float) -> None:
        await every(interval, self.snapshot, "bandit snapshot")

    async def stop(self) -> None:
        if self._snapshotter is not None:
            self._snapshotter.cancel()
            await asyncio.gather(self._snapshotter, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()  # type: ignore[attr-defined]
        try:
            await self.snapshot()
        except Exception:
            log.exception("bandit snapshot at shutdown failed")
