"""The contextual learner (ai.learner.engine vw) keeps the replica guarantees,
on real NATS JetStream and Redis: a ranking made on one replica is rewarded
through another (pending rankings in Redis), every replica learns every
reward in stream order and so ranks alike, any replica may sweep closed
windows and each window counts once, and a restarted replica resumes from the
snapshot (VW's own model bytes in the NATS object store) plus the stream.

Two AI engines stand for two replicas (no Triton: every propensity is 0). Time
is a ManualClock per replica; the tests wait for stream sequences, never a
clock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.js.errors
import pytest
from ai_helpers import ai_config
from nats.js import JetStreamContext

from ai_plane.bandit import LinearThompsonBandit
from ai_plane.breaker import CircuitBreaker
from ai_plane.engine import AiEngine, Candidate, RankAnswer, RankQuery
from ai_plane.features import OfferEntry
from ai_plane.learner import RewardLearner
from ai_plane.outcomes import AI_STREAM, OutcomeSpine
from ai_plane.scorer import Scorer
from ai_plane.store.base import build_store
from triplane.ai.v1 import ai_pb2
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config
from triplane.runtime.deadline import Deadline

WAIT_S = 60.0  # bounds a hang only
CATALOG = [
    Candidate(f"offer_{c}", OfferEntry("cashback", 1000, {"category": c}))
    for c in ("travel", "grocery", "fuel")
]


def _config(state: Path, redis_url: str, namespace: str) -> Config:
    return ai_config(
        state,
        {
            "replicas": 2,
            "registry": {"backend": "postgres", "postgres_dsn": "postgresql://unused/none"},
            "features": {"backend": "redis", "redis_url": redis_url, "namespace": namespace},
            "bandit": {"snapshot_interval_s": 0},
            "learner": {"engine": "vw", "reward_window_s": 600},
        },
    )


@dataclass
class Replica:
    engine: AiEngine
    spine: OutcomeSpine
    clock: ManualClock
    js: JetStreamContext

    @property
    def rewards(self) -> RewardLearner:
        assert self.engine.rewards is not None
        return self.engine.rewards


@asynccontextmanager
async def replica(config: Config, url: str) -> AsyncIterator[Replica]:
    ai = config.ai
    clock = ManualClock()
    breaker = CircuitBreaker(ai.breaker.failure_threshold, ai.breaker.open_s)
    engine = AiEngine(
        ai,
        build_store(ai.features, clock),
        Scorer(ai, None, breaker, clock),
        LinearThompsonBandit(0.05, 0.1, 8, 1),
        clock,
    )
    assert engine.rewards is not None
    nc = await nats.connect(url)
    spine = OutcomeSpine(nc.jetstream(), config.nats, ai, engine.rewards, clock.now_us)
    await spine.start()
    engine.spine = spine
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            await spine.stop()
            await engine.pending.close()
            await engine.store.close()
            await nc.close()

    found = Replica(engine, spine, clock, nc.jetstream())
    found.stop = stop  # type: ignore[attr-defined]
    try:
        yield found
    finally:
        await stop()
        engine.rewards.vw.close()


async def caught_up(*replicas: Replica, tenant: str) -> None:
    """Every replica has applied the tenant's last reward on the stream (and
    whatever any of them applied already): a reward just published may not
    have reached either replica's subscription yet."""
    target = max(r.rewards.sequence for r in replicas)
    try:
        last = await replicas[0].js.get_last_msg(AI_STREAM, f"triplane.ai.{tenant}.learner.reward")
        target = max(target, last.seq or 0)
    except nats.js.errors.NotFoundError:
        pass  # none of the tenant's rewards yet
    for r in replicas:
        await asyncio.wait_for(r.rewards.wait_for(target), WAIT_S)


async def rank(engine: AiEngine, tenant: str, segment: float) -> RankAnswer:
    return await engine.rank(
        RankQuery(
            tenant_id=tenant,
            account_id="acct-1",
            candidates=CATALOG,
            hour_of_day=12,
            features={"segment": segment},
            surface="checkout",
        ),
        Deadline.from_remaining(5.0),
    )


async def probe(r: Replica, tenant: str) -> list[dict[str, float]]:
    """What the replica's model says in both contexts (probabilities)."""
    out = []
    for segment in (0.0, 1.0):
        answer = await rank(r.engine, tenant, segment)
        out.append({o.offer_id: o.exploration_probability for o in answer.offers})
    return out


@pytest.fixture
def namespace() -> str:
    return f"learner_{uuid.uuid4().hex[:8]}"


async def test_rewards_reported_to_either_replica_teach_both_alike(
    nats_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url, namespace)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    async with replica(config, nats_url) as a, replica(config, nats_url) as b:
        # The stream holds other tests' rewards too: count from here.
        await caught_up(a, b, tenant=tenant)
        base = a.rewards.vw.learned
        for i in range(40):
            ranker, reporter = (a, b) if i % 2 else (b, a)
            segment = float(i % 2)
            answer = await rank(ranker.engine, tenant, segment)
            good = answer.chosen_offer_id == ("offer_travel" if segment else "offer_grocery")
            kind = ai_pb2.OUTCOME_KIND_CONVERTED if good else ai_pb2.OUTCOME_KIND_DISMISSED
            result = await reporter.engine.outcome(
                tenant, answer.rank_id, answer.chosen_offer_id, 0.0, f"o{i}", kind=kind
            )
            assert result.applied  # the other replica's ranking, read from Redis
        await caught_up(a, b, tenant=tenant)
        assert a.rewards.vw.learned == b.rewards.vw.learned == base + 40
        # The same outcome again, through either replica, is a repeat.
        assert not (await a.engine.outcome(tenant, answer.rank_id, "x", 0.0, "o39")).applied
        assert await probe(a, tenant) == await probe(b, tenant)


async def test_any_replica_sweeps_a_closed_window_and_it_counts_once(
    nats_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url, namespace)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    async with replica(config, nats_url) as a, replica(config, nats_url) as b:
        await caught_up(a, b, tenant=tenant)
        base, base_late = a.rewards.vw.learned, a.rewards.late
        silent = await rank(a.engine, tenant, 0.0)
        answered = await rank(b.engine, tenant, 1.0)
        assert (
            await a.engine.outcome(
                tenant,
                answered.rank_id,
                answered.chosen_offer_id,
                0.0,
                "in-time",
                kind=ai_pb2.OUTCOME_KIND_CONVERTED,
            )
        ).applied
        for r in (a, b):
            r.clock.advance(601)
        # Both replicas sweep at once: the silent ranking's 0 is one reward.
        swept = await asyncio.gather(a.engine.sweep(), b.engine.sweep())
        assert sum(swept) >= 1
        await caught_up(a, b, tenant=tenant)
        assert a.rewards.vw.learned == b.rewards.vw.learned == base + 2
        assert await a.engine.sweep() == await b.engine.sweep() == 0
        # A late outcome through either replica is recorded, not learned.
        late = await b.engine.outcome(
            tenant,
            silent.rank_id,
            silent.chosen_offer_id,
            0.0,
            "late",
            kind=ai_pb2.OUTCOME_KIND_CONVERTED,
        )
        assert late.late and not late.applied
        await caught_up(a, b, tenant=tenant)
        assert a.rewards.vw.learned == b.rewards.vw.learned == base + 2
        assert a.rewards.late == b.rewards.late == base_late + 1


async def test_a_restarted_replica_resumes_from_its_snapshot_and_the_stream(
    nats_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url, namespace)
    tenant = f"t{uuid.uuid4().hex[:10]}"

    async def teach(ranker: Replica, start: int, count: int) -> None:
        for i in range(start, start + count):
            answer = await rank(ranker.engine, tenant, float(i % 2))
            kind = ai_pb2.OUTCOME_KIND_CONVERTED if i % 3 else ai_pb2.OUTCOME_KIND_IGNORED
            await ranker.engine.outcome(
                tenant, answer.rank_id, answer.chosen_offer_id, 0.0, f"o{i}", kind=kind
            )

    async with replica(config, nats_url) as b:
        async with replica(config, nats_url) as a:
            await caught_up(a, b, tenant=tenant)
            before_b = b.rewards.vw.learned
            await teach(a, 0, 12)
            await caught_up(a, b, tenant=tenant)
            await a.stop()  # type: ignore[attr-defined]  # shutdown snapshot
            covered = a.rewards.sequence
        await teach(b, 12, 6)  # while A is down
        async with replica(config, nats_url) as restarted:
            assert restarted.spine.resumed_from == covered
            await caught_up(restarted, b, tenant=tenant)
            # Resumed, not replayed: it learned only what came after.
            assert restarted.rewards.vw.learned == b.rewards.vw.learned - before_b - 12
            assert await probe(restarted, tenant) == await probe(b, tenant)
            assert restarted.rewards.seen(f"{tenant}|o0")
