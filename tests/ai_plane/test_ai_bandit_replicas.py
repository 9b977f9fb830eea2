"""The bandit learns from every outcome whichever replica ranked it, on real
NATS JetStream and Redis: pending rankings in Redis (ai.bandit.pending_store),
outcomes on TRIPLANE_AI that every replica applies in stream order, and the
posterior snapshotted (NATS object store) so a restart resumes it.

Two AI engines stand for two replicas (Rank and ReportOutcome need no Triton:
with no live model the propensity is 0 and the bandit still ranks and
learns). The tests wait for the sequence a replica applied, never a clock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import numpy as np
import pytest
from ai_helpers import ai_config

from ai_plane.bandit import LinearThompsonBandit
from ai_plane.breaker import CircuitBreaker
from ai_plane.engine import AiEngine, Candidate, RankQuery
from ai_plane.features import OfferEntry
from ai_plane.outcomes import OutcomeSpine, outcome_key
from ai_plane.scorer import Scorer
from ai_plane.store.base import build_store
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, ConfigError
from triplane.runtime.deadline import Deadline

# Generous: only bounds a hang, never asserted on.
WAIT_S = 60.0


def _config(state: Path, redis_url: str, namespace: str) -> Config:
    return ai_config(
        state,
        {
            "replicas": 2,
            "registry": {"backend": "postgres", "postgres_dsn": "postgresql://unused/none"},
            "features": {"backend": "redis", "redis_url": redis_url, "namespace": namespace},
            # Only the shutdown snapshot: the test decides when one is taken.
            "bandit": {"snapshot_interval_s": 0},
            # The Thompson bandit's own replica guarantees (the contextual
            # learner's: test_ai_learner_replicas.py).
            "learner": {"engine": "thompson"},
        },
    )


@dataclass
class Replica:
    engine: AiEngine
    spine: OutcomeSpine

    def state(self) -> dict[str, np.ndarray]:
        return self.engine.bandit.state()


@asynccontextmanager
async def replica(config: Config, url: str) -> AsyncIterator[Replica]:
    ai = config.ai
    clock = ManualClock()
    breaker = CircuitBreaker(ai.breaker.failure_threshold, ai.breaker.open_s)
    bandit = LinearThompsonBandit(
        ai.bandit.prior_variance,
        ai.bandit.noise_variance,
        ai.bandit.probability_samples,
        ai.bandit.seed,
        max_arms=ai.bandit.max_arms,
    )
    engine = AiEngine(
        ai, build_store(ai.features, clock), Scorer(ai, None, breaker, clock), bandit, clock
    )
    nc = await nats.connect(url)
    spine = OutcomeSpine(nc.jetstream(), config.nats, ai, engine.learner, clock.now_us)
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

    found = Replica(engine, spine)
    found.stop = stop  # type: ignore[attr-defined]
    try:
        yield found
    finally:
        await stop()


async def caught_up(*replicas: Replica) -> None:
    """Waits until every replica applied the stream as far as the furthest."""
    target = max(r.engine.learner.sequence for r in replicas)
    for r in replicas:
        await asyncio.wait_for(r.engine.learner.wait_for(target), WAIT_S)


def assert_same_posterior(a: Replica, b: Replica) -> None:
    left, right = a.state(), b.state()
    assert left.keys() == right.keys()
    for key in left:
        assert np.array_equal(left[key], right[key]), key


async def rank(engine: AiEngine, tenant: str, account: str) -> str:
    candidates = [
        Candidate(f"offer_{i}", OfferEntry(product="cashback", value_minor=100 * (i + 1)))
        for i in range(3)
    ]
    answer = await engine.rank(
        RankQuery(tenant_id=tenant, account_id=account, candidates=candidates, hour_of_day=12),
        Deadline.from_remaining(5.0),
    )
    return answer.rank_id


@pytest.fixture
def namespace() -> str:
    return f"bandit_{uuid.uuid4().hex[:8]}"


async def test_an_outcome_reported_to_the_replica_that_did_not_rank_teaches_both(
    nats_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url, namespace)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    async with replica(config, nats_url) as a, replica(config, nats_url) as b:
        rank_id = await rank(a.engine, tenant, "acct-1")
        # B never saw the ranking: it reads it from Redis.
        assert await b.engine.report_outcome(tenant, rank_id, "offer_1", 1.0, "out-1") is True
        await caught_up(a, b)
        assert a.engine.learner.seen(outcome_key(tenant, "out-1"))
        # The same outcome id again, through either replica, is a repeat.
        assert await a.engine.report_outcome(tenant, rank_id, "offer_1", 1.0, "out-1") is False
        assert await b.engine.report_outcome(tenant, rank_id, "offer_1", 1.0, "out-1") is False
        # And the other way round, for another offer of the ranking.
        assert await a.engine.report_outcome(tenant, rank_id, "offer_2", 0.0, "out-2") is True
        await caught_up(a, b)
        arm = f"{tenant}|offer_1"
        assert a.engine.bandit.arm_count() == b.engine.bandit.arm_count() >= 2
        prior_precision, _ = LinearThompsonBandit(0.05, 0.1, 1, 0).posterior("never")
        precision, _ = a.engine.bandit.posterior(arm)
        assert not np.array_equal(precision, prior_precision)  # it moved
        assert_same_posterior(a, b)
        # Outcome ids are unique per tenant only: another tenant's "out-1" is
        # another outcome (JetStream's dedupe window spans the whole stream).
        other = f"t{uuid.uuid4().hex[:10]}"
        other_rank = await rank(b.engine, other, "acct-1")
        assert await a.engine.report_outcome(other, other_rank, "offer_0", 1.0, "out-1") is True
        await caught_up(a, b)
        assert_same_posterior(a, b)
        # One snapshot per sequence: the second replica keeps the first's.
        assert await a.spine.snapshot() is True
        assert await b.spine.snapshot() is False


async def test_a_restarted_replica_resumes_from_its_snapshot_and_the_stream(
    nats_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url, namespace)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    async with replica(config, nats_url) as b:
        async with replica(config, nats_url) as a:
            for i in range(4):
                rank_id = await rank(a.engine, tenant, f"acct-{i}")
                reporter = (a, b)[i % 2].engine
                assert await reporter.report_outcome(tenant, rank_id, "offer_0", 1.0, f"o{i}")
            await caught_up(a, b)
            before = a.state()
            await a.stop()  # type: ignore[attr-defined]  # shutdown snapshot
            covered = a.engine.learner.sequence
        # While A is down, B learns more.
        for i in range(4, 7):
            rank_id = await rank(b.engine, tenant, f"acct-{i}")
            assert await b.engine.report_outcome(tenant, rank_id, "offer_2", 0.5, f"o{i}")
        async with replica(config, nats_url) as restarted:
            assert restarted.spine.resumed_from == covered
            await caught_up(restarted, b)
            assert_same_posterior(restarted, b)
            assert not np.array_equal(restarted.state()["precision"], before["precision"])
            # Outcome ids learned before the restart are still repeats.
            assert restarted.engine.learner.seen(outcome_key(tenant, "o0"))


async def test_a_snapshot_alone_restores_the_posterior_exactly(
    nats_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url, namespace)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    async with replica(config, nats_url) as a:
        for i in range(3):
            rank_id = await rank(a.engine, tenant, f"acct-{i}")
            assert await a.engine.report_outcome(tenant, rank_id, f"offer_{i}", 1.0, f"s{i}")
        before = a.state()
    async with replica(config, nats_url) as restarted:
        await caught_up(restarted)
        after = restarted.state()
        for key in before:
            assert np.array_equal(before[key], after[key]), key


def test_more_than_one_replica_needs_shared_rankings_and_outcomes(tmp_path: Path) -> None:
    base = {
        "replicas": 2,
        "registry": {"backend": "postgres", "postgres_dsn": "postgresql://unused/none"},
        "features": {"backend": "redis"},
    }
    with pytest.raises(ConfigError, match="pending_store"):
        ai_config(tmp_path, {**base, "bandit": {"pending_store": "in_process"}})
    with pytest.raises(ConfigError, match="outcomes"):
        ai_config(tmp_path, {**base, "bandit": {"outcomes": "local"}})
    assert ai_config(tmp_path, base).ai.bandit.pending_store == "auto"
