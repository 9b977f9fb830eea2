"""Several policy plane replicas on one PostgreSQL database (issue 12 §1,
ARCHITECTURE.md rule 9): the decision log takes many writers, on one shared
chain (serialized by a row lock on the chain's head) or on one chain per
writer (`policy.decision_log.writer_id`), and verification, retention and
replay cover every chain together; an opt-out or a contact written through
one replica is what the other answers from its next check.

Real PostgreSQL (the `pg_dsn` fixture: skipped loudly without a server,
failed under CI=true) and real gRPC servers with mutual TLS; no NATS."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from policy_plane.app import PolicyPlane, build_plane
from policy_plane.bundle import BundleSource, shipped_default_path
from policy_plane.engine import PolicyEngine
from policy_plane.replay import ReplayWindow
from policy_plane.store import ChainMark
from triplane.common.v1 import types_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, ConfigError
from triplane.runtime.tls import channel_for

from .conftest import TENANT, Stubs, make_config, payment_input, put_customer, started_engine

# Small groups, so each replica's writer commits many transactions that
# meet the other's on the database.
SMALL_GROUPS = {"max_batch_records": 3}
# A bounded wait for the other replica's writer (a test that hangs fails here).
WAIT_S = 30.0
# Planes in these tests follow the store's bundle slots this often.
FOLLOW_INTERVAL_S = 0.05


def replica_config(state_dir: Path, pg_dsn: str, writer_id: str = "") -> Config:
    """Replicas share the database and the state dir (the same log, token and
    PII keys, as pods share Secrets)."""
    return make_config(
        state_dir,
        pg_dsn,
        decision_log={**SMALL_GROUPS, "writer_id": writer_id},
        bundles={"follow_interval_s": FOLLOW_INTERVAL_S},
    )


async def stop(*engines: PolicyEngine) -> None:
    for engine in engines:
        await engine.stop()
        engine.store.db.close()


async def decide(engine: PolicyEngine, prefix: str, count: int) -> list[str]:
    decisions = await asyncio.gather(
        *(
            engine.evaluate(payment_input(f"{prefix}{i}", amount_minor=1_000 + i))
            for i in range(count)
        )
    )
    return [d.record.decision_id for d, _ in decisions]


def chain_seqs(engine: PolicyEngine, chain_id: str) -> list[int]:
    return [row.seq for row in engine.store.chain_page(chain_id, 0, 10_000)]


async def assert_all_verified_and_replayed(engine: PolicyEngine, decisions: int) -> None:
    result = await engine.verify_log()
    assert result.valid, result
    assert result.records_checked == decisions
    report = await engine.replay(ReplayWindow(TENANT, "", 0, 0, 0), "")
    assert report.replayed == decisions
    assert report.determinism_score == 1.0, report.changed


@pytest.mark.parametrize("writer_ids", [("", ""), ("pod-a", "pod-b")], ids=["shared", "own"])
async def test_two_replicas_deciding_at_once_log_every_decision_and_it_all_verifies(
    state_dir: Path, pg_dsn: str, clock: ManualClock, writer_ids: tuple[str, str]
) -> None:
    a = await started_engine(replica_config(state_dir, pg_dsn, writer_ids[0]), clock)
    b = await started_engine(replica_config(state_dir, pg_dsn, writer_ids[1]), clock)
    try:
        ids_a, ids_b = await asyncio.gather(decide(a, "a", 40), decide(b, "b", 40))
        assert len(set(ids_a) | set(ids_b)) == 80
        for decision_id in ids_a + ids_b:
            assert a.store.get_decision(decision_id) is not None
        chains = a.store.chain_ids(with_rows=True)
        if writer_ids == ("", ""):
            # One chain, both writers' records in it, no gap and no fork.
            assert chains == ["main"]
            assert chain_seqs(a, "main") == list(range(1, 81))
        else:
            assert chains == ["main-pod-a", "main-pod-b"]
            assert chain_seqs(a, "main-pod-a") == list(range(1, 41))
            assert chain_seqs(a, "main-pod-b") == list(range(1, 41))
        # Either replica verifies (and replays) everything, its own and the other's.
        await assert_all_verified_and_replayed(a, 80)
        await assert_all_verified_and_replayed(b, 80)
    finally:
        await stop(a, b)


async def test_a_writer_waits_for_the_other_writers_append_to_a_shared_chain(
    state_dir: Path, pg_dsn: str, clock: ManualClock
) -> None:
    """A holds the chain's head locked (its append's transaction open) while
    B starts its own append: B chains after A's record, never beside it. The
    log keeps nothing of the chain in memory, so B is not misled by the head
    it saw when it started."""
    a = await started_engine(replica_config(state_dir, pg_dsn), clock)
    b = await started_engine(replica_config(state_dir, pg_dsn), clock)
    a_holds, b_appending = threading.Event(), threading.Event()
    real_a, real_b = a.store.lock_head, b.store.lock_head

    def a_lock_head(tx: Any, chain_id: str) -> ChainMark | None:
        head = real_a(tx, chain_id)
        a_holds.set()
        assert b_appending.wait(WAIT_S), "B's writer never started its append"
        return head

    def b_lock_head(tx: Any, chain_id: str) -> ChainMark | None:
        b_appending.set()
        return real_b(tx, chain_id)

    try:
        await decide(a, "before", 1)
        a.store.lock_head = a_lock_head  # type: ignore[method-assign]
        b.store.lock_head = b_lock_head  # type: ignore[method-assign]
        first = asyncio.create_task(decide(a, "a", 1))
        assert await asyncio.to_thread(a_holds.wait, WAIT_S)
        second = asyncio.create_task(decide(b, "b", 1))
        await asyncio.gather(first, second)
        assert chain_seqs(a, "main") == [1, 2, 3]
        await assert_all_verified_and_replayed(b, 3)
    finally:
        await stop(a, b)


async def test_an_old_single_chain_verifies_beside_replica_chains_and_retention_purges_all(
    state_dir: Path, pg_dsn: str, clock: ManualClock
) -> None:
    # The log as one process wrote it before replicas had chains of their own.
    single = await started_engine(make_config(state_dir, pg_dsn), clock)
    await decide(single, "old", 5)
    await stop(single)
    a = await started_engine(replica_config(state_dir, pg_dsn, "pod-a"), clock)
    b = await started_engine(replica_config(state_dir, pg_dsn, "pod-b"), clock)
    try:
        clock.advance(10 * 86_400)
        await asyncio.gather(decide(a, "a", 4), decide(b, "b", 3))
        assert a.store.chain_ids(with_rows=True) == ["main", "main-pod-a", "main-pod-b"]
        await assert_all_verified_and_replayed(a, 12)
        assert (await a.verify_log("main")).records_checked == 5

        # Retention on one replica purges every chain's old prefix, the
        # old chain's included; the other replica's sweep finds nothing left.
        clock.advance(1461 * 86_400 - 5 * 86_400)
        assert await a.purge_expired() == 5
        assert await b.purge_expired() == 0
        result = await b.verify_log()
        assert result.valid and result.records_checked == 7, result

        # A record altered in one replica's chain fails the whole log, naming it.
        with a.store.db.tx() as tx:
            tx.execute(
                "UPDATE decision_log SET outcome = 'deny' WHERE chain_id = ? AND seq = 2",
                ("main-pod-b",),
            )
        result = await a.verify_log()
        assert not result.valid and result.problem == "RECORD_ALTERED"
        assert "main-pod-b" in result.detail
    finally:
        await stop(a, b)


def test_a_writer_id_that_makes_no_chain_id_is_refused(state_dir: Path, pg_dsn: str) -> None:
    from policy_plane.app import build_engine

    with pytest.raises(ConfigError, match="writer_id"):
        build_engine(replica_config(state_dir, pg_dsn, "pod a/1"))


# ------------------------------------------------------------ consent and caps


@pytest.fixture
async def replicas(
    state_dir: Path, pg_dsn: str, clock: ManualClock
) -> AsyncIterator[tuple[PolicyPlane, PolicyPlane]]:
    """Two real planes (gRPC, mutual TLS) on one PostgreSQL database."""
    planes: list[PolicyPlane] = []
    try:
        for writer_id in ("pod-a", "pod-b"):
            plane = build_plane(
                replica_config(state_dir, pg_dsn, writer_id), clock, listen="127.0.0.1:0"
            )
            await plane.start()
            planes.append(plane)
        await planes[0].engine.create_tenant(TENANT, "Acme")
        await put_customer(planes[0].engine, TENANT)
        yield planes[0], planes[1]
    finally:
        for plane in planes:
            await plane.stop()


def consent(status: pb.ConsentStatus.ValueType, customer_id: str = "c1") -> pb.SetConsentRequest:
    return pb.SetConsentRequest(
        tenant_id=TENANT,
        customer_id=customer_id,
        consent=pb.Consent(
            channel=pb.CHANNEL_PUSH,
            topic=pb.TOPIC_MARKETING,
            status=status,
            lawful_basis=pb.LAWFUL_BASIS_CONSENT,
        ),
    )


CHECK = pb.CheckContactRequest(
    tenant_id=TENANT, customer_id="c1", channel=pb.CHANNEL_PUSH, topic=pb.TOPIC_MARKETING
)


async def test_an_opt_out_through_one_replica_applies_on_the_other_from_its_next_check(
    replicas: tuple[PolicyPlane, PolicyPlane],
) -> None:
    """The stated bound: the next check after the write returned (consent is
    read from the shared store on every check, nothing is cached)."""
    a, b = replicas
    async with (
        channel_for(a.config, f"127.0.0.1:{a.server.port}") as channel_a,
        channel_for(b.config, f"127.0.0.1:{b.server.port}") as channel_b,
    ):
        via_a, via_b = Stubs(channel_a), Stubs(channel_b)
        # The tenant was made through A after B started: B knows it too.
        assert not (await via_b.consent.CheckContact(CHECK)).allowed  # no grant yet
        await via_a.consent.SetConsent(consent(pb.CONSENT_STATUS_GRANTED))
        assert (await via_b.consent.CheckContact(CHECK)).allowed
        await via_a.consent.SetConsent(consent(pb.CONSENT_STATUS_WITHDRAWN))
        answer = await via_b.consent.CheckContact(CHECK)
        assert not answer.allowed and answer.block == pb.CONTACT_BLOCK_NO_CONSENT
        got = await via_b.consent.GetConsent(
            pb.GetConsentRequest(tenant_id=TENANT, customer_id="c1")
        )
        assert [c.status for c in got.consents] == [pb.CONSENT_STATUS_WITHDRAWN]

        # Contacts recorded through A count against B's caps (2 per channel a day).
        await via_a.consent.SetConsent(consent(pb.CONSENT_STATUS_GRANTED))
        for index in range(2):
            assert (await via_b.consent.CheckContact(CHECK)).allowed
            await via_a.consent.RecordContact(
                pb.RecordContactRequest(
                    tenant_id=TENANT,
                    customer_id="c1",
                    contact_id=f"contact-{index}",
                    channel=pb.CHANNEL_PUSH,
                    topic=pb.TOPIC_MARKETING,
                )
            )
        answer = await via_b.consent.CheckContact(CHECK)
        assert not answer.allowed and answer.block == pb.CONTACT_BLOCK_CAPPED
        # A contact profile marked vulnerable through B blocks marketing on A.
        await via_b.consent.PutContactProfile(
            pb.PutContactProfileRequest(
                profile=pb.ContactProfile(tenant_id=TENANT, customer_id="c2", vulnerable=True)
            )
        )
        check_c2 = pb.CheckContactRequest(
            tenant_id=TENANT, customer_id="c2", channel=pb.CHANNEL_PUSH, topic=pb.TOPIC_MARKETING
        )
        await via_b.consent.SetConsent(consent(pb.CONSENT_STATUS_GRANTED, "c2"))
        answer = await via_a.consent.CheckContact(check_c2)
        assert not answer.allowed and answer.block == pb.CONTACT_BLOCK_VULNERABLE

        # Both replicas' decisions, verified as one log through either.
        await asyncio.gather(decide(a.engine, "a", 5), decide(b.engine, "b", 5))
        verified = await via_b.policy.VerifyDecisionLog(pb.VerifyDecisionLogRequest())
        assert verified.valid and verified.records_checked == 10


# ------------------------------------------------------------ offers


def cashback(offer_id: str) -> pb.PutOfferRequest:
    return pb.PutOfferRequest(
        offer=pb.Offer(
            tenant_id=TENANT,
            offer_id=offer_id,
            product=pb.PRODUCT_CASHBACK,
            value=types_pb2.Money(amount_minor=500, currency="USD"),
            channels=[pb.CHANNEL_PUSH],
        )
    )


async def test_an_offer_put_or_stopped_through_one_replica_is_served_by_the_other(
    replicas: tuple[PolicyPlane, PolicyPlane],
) -> None:
    """The stated bound: the other replica's next call (each catalog read
    first reads the tenant's catalog version)."""
    a, b = replicas
    eligible = pb.GetEligibleOffersRequest(tenant_id=TENANT, customer_id="c1")
    async with (
        channel_for(a.config, f"127.0.0.1:{a.server.port}") as channel_a,
        channel_for(b.config, f"127.0.0.1:{b.server.port}") as channel_b,
    ):
        via_a, via_b = Stubs(channel_a), Stubs(channel_b)
        await via_a.consent.SetConsent(consent(pb.CONSENT_STATUS_GRANTED))
        assert not (await via_b.offers.GetEligibleOffers(eligible)).eligible  # B read it empty
        await via_a.offers.PutOffer(cashback("o1"))
        answer = await via_b.offers.GetEligibleOffers(eligible)
        assert [o.offer_id for o in answer.eligible] == ["o1"]
        got = await via_b.offers.GetOffer(pb.GetOfferRequest(tenant_id=TENANT, offer_id="o1"))
        assert got.offer.revision == 1
        await via_b.offers.StopOffer(pb.StopOfferRequest(tenant_id=TENANT, offer_id="o1"))
        answer = await via_a.offers.GetEligibleOffers(eligible)
        assert not answer.eligible
        assert [(o.offer_id, o.reason) for o in answer.excluded] == [
            ("o1", pb.EXCLUSION_REASON_NOT_ELIGIBLE)
        ]
        listed = await via_a.offers.ListOffers(pb.ListOffersRequest(tenant_id=TENANT))
        assert [(o.offer_id, o.revision) for o in listed.offers] == [("o1", 2)]

        # Both replicas changing one offer at once: each change is a revision
        # of its own (writers take turns on the stored row), none is lost.
        await asyncio.gather(
            *(stub.offers.PutOffer(cashback("o1")) for stub in (via_a, via_b, via_a, via_b))
        )
        got = await via_a.offers.GetOffer(pb.GetOfferRequest(tenant_id=TENANT, offer_id="o1"))
        assert got.offer.revision == 6


# ------------------------------------------------------------ bundles


def slots(engine: PolicyEngine) -> tuple[str, str]:
    """The live and shadow versions a replica serves ("" for no shadow)."""
    live, shadow = engine.bundles.live, engine.bundles.shadow
    return (live.version if live else "", shadow.version if shadow else "")


def canary() -> BundleSource:
    """The shipped bundle under another label: another version."""
    return BundleSource(yaml_text=shipped_default_path().read_text(), label_override="canary")


async def test_a_bundle_switched_through_one_replica_is_followed_by_the_other(
    state_dir: Path, pg_dsn: str, clock: ManualClock
) -> None:
    """Live and shadow slots are shared in the store; follow() (which each
    plane runs every policy.bundles.follow_interval_s) makes them current."""
    a = await started_engine(replica_config(state_dir, pg_dsn), clock)
    b = await started_engine(replica_config(state_dir, pg_dsn), clock)
    try:
        shipped = slots(a)[0]
        assert b.bundles.follow() is False  # nothing switched yet
        loaded = await asyncio.to_thread(a.bundles.load, canary(), "live")
        assert loaded.version != shipped
        assert slots(b) == (shipped, "")  # B has not looked yet
        assert b.bundles.follow() is True
        assert slots(b) == (loaded.version, "")
        decided, _ = await b.evaluate(payment_input("after-switch"))
        assert decided.record.bundle_version == loaded.version

        a.bundles.set_shadow(shipped)
        assert b.bundles.follow() is True
        assert slots(b) == (loaded.version, shipped)
        a.bundles.activate(shipped)
        a.bundles.set_shadow("")
        assert b.bundles.follow() is True
        assert slots(b) == (shipped, "")
        assert b.bundles.follow() is False
    finally:
        await stop(a, b)


async def test_a_running_replica_serves_a_bundle_activated_through_the_other(
    replicas: tuple[PolicyPlane, PolicyPlane],
) -> None:
    """The stated bound: within policy.bundles.follow_interval_s (here
    FOLLOW_INTERVAL_S) of the switch returning; waited for here up to a
    hundred intervals, so a plane that never follows fails."""
    a, b = replicas
    async with (
        channel_for(a.config, f"127.0.0.1:{a.server.port}") as channel_a,
        channel_for(b.config, f"127.0.0.1:{b.server.port}") as channel_b,
    ):
        via_a, via_b = Stubs(channel_a), Stubs(channel_b)
        before = (await via_b.bundles.GetActiveBundle(pb.GetActiveBundleRequest())).live.version
        source = canary()
        loaded = await via_a.bundles.LoadBundle(
            pb.LoadBundleRequest(
                content=source.yaml_text,
                label=source.label_override,
                target=pb.BUNDLE_TARGET_LIVE,
            )
        )
        assert loaded.bundle.version != before
        live = before
        for _ in range(100):
            answer = await via_b.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
            live = answer.live.version
            if live == loaded.bundle.version:
                break
            await asyncio.sleep(FOLLOW_INTERVAL_S)
        assert live == loaded.bundle.version


# ------------------------------------------------------------ cases


async def test_a_case_opened_on_one_replica_is_claimed_once_across_both(
    replicas: tuple[PolicyPlane, PolicyPlane],
) -> None:
    a, b = replicas
    decision, _ = await a.engine.evaluate(payment_input("rv-1", score=0.75))
    assert decision.record.case_id
    case_id = decision.record.case_id
    async with (
        channel_for(a.config, f"127.0.0.1:{a.server.port}") as channel_a,
        channel_for(b.config, f"127.0.0.1:{b.server.port}") as channel_b,
    ):
        via_a, via_b = Stubs(channel_a), Stubs(channel_b)
        claimed = await via_b.cases.ClaimCase(
            pb.ClaimCaseRequest(tenant_id=TENANT, case_id=case_id, reviewer="ana")
        )
        assert claimed.case.status == pb.CASE_STATUS_CLAIMED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await via_a.cases.ClaimCase(
                pb.ClaimCaseRequest(tenant_id=TENANT, case_id=case_id, reviewer="bob")
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await via_a.cases.ResolveCase(
            pb.ResolveCaseRequest(
                tenant_id=TENANT,
                case_id=case_id,
                reviewer="ana",
                resolution=pb.RESOLUTION_APPROVE,
            )
        )
        got = await via_b.cases.GetCase(pb.GetCaseRequest(tenant_id=TENANT, case_id=case_id))
        assert got.case.status == pb.CASE_STATUS_RESOLVED and got.case.assignee == "ana"
