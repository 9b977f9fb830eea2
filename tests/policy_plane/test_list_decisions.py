"""ListDecisions: a tenant's logged decisions found by id, customer (id or
name token, never the name), account and time window, newest first and
paged; bad filters refused naming their field; on SQLite and PostgreSQL; and
over gRPC with what a listed decision carries."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from policy_plane import decision_search
from policy_plane.engine import PolicyEngine
from policy_plane.model import Party
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import InvalidArgument

from .conftest import OTHER_TENANT, TENANT, Stubs, payment_input, replace_payment
from .test_grpc import request


async def _decide(
    engine: PolicyEngine, clock: ManualClock, key: str, tenant: str = TENANT, **payment: object
) -> tuple[str, int]:
    """One decision a second later than the last; (its id, its log time)."""
    clock.advance(1.0)
    inp = payment_input(key, tenant_id=tenant)
    if payment:
        inp = replace_payment(inp, **payment)
    decision, _ = await engine.evaluate(inp)
    return decision.record.decision_id, clock.now_us()


async def _ids(engine: PolicyEngine, **filters: object) -> list[str]:
    answer = await decision_search.list_decisions(
        engine,
        pb.ListDecisionsRequest(tenant_id=TENANT, **filters),  # type: ignore[arg-type]
    )
    return [listed.decision.decision_id for listed in answer.decisions]


async def test_filters_and_pages_newest_first(any_engine: PolicyEngine, clock: ManualClock) -> None:
    engine = any_engine
    jane = [await _decide(engine, clock, f"jane-{i}") for i in range(5)]
    john = [
        await _decide(
            engine,
            clock,
            f"john-{i}",
            account_id="acct-2",
            customer_id="cust-2",
            customer=Party(name="John Other", country="US"),
        )
        for i in range(2)
    ]
    other_tenant, _ = await _decide(engine, clock, "elsewhere", tenant=OTHER_TENANT)
    everything = [d for d, _ in reversed(jane + john)]
    assert await _ids(engine) == everything

    # Pages of 3: every decision once, in the same order, and a last page
    # without a next token.
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        answer = await decision_search.list_decisions(
            engine, pb.ListDecisionsRequest(tenant_id=TENANT, page_size=3, page_token=token)
        )
        seen += [listed.decision.decision_id for listed in answer.decisions]
        pages += 1
        token = answer.next_page_token
        if not token:
            break
    assert seen == everything and pages == 3

    assert await _ids(engine, account_id="acct-2") == [d for d, _ in reversed(john)]
    assert await _ids(engine, customer="cust-1") == [d for d, _ in reversed(jane)]
    jane_token = engine.sealer.token(TENANT, "Jane Example")
    assert await _ids(engine, customer=jane_token) == [d for d, _ in reversed(jane)]
    # The same name is another token in another tenant: nothing here.
    assert await _ids(engine, customer=engine.sealer.token(OTHER_TENANT, "Jane Example")) == []
    # The window is [start, end) on the log's time.
    start, end = wire.timestamp(jane[1][1]), wire.timestamp(jane[3][1])
    assert await _ids(engine, start_time=start, end_time=end) == [jane[2][0], jane[1][0]]
    assert await _ids(engine, customer="cust-1", start_time=wire.timestamp(jane[4][1])) == [
        jane[4][0]
    ]

    # By id: the decision, if the other filters agree; never another tenant's.
    assert await _ids(engine, decision_id=john[0][0]) == [john[0][0]]
    assert await _ids(engine, decision_id=john[0][0], account_id="acct-1") == []
    assert await _ids(engine, decision_id=other_tenant) == []
    listed = (
        await decision_search.list_decisions(
            engine, pb.ListDecisionsRequest(tenant_id=TENANT, decision_id=jane[0][0])
        )
    ).decisions[0]
    assert listed.customer_id == "cust-1" and listed.customer_name_token == jane_token
    assert listed.amount.amount_minor == 2_500 and listed.amount.currency == "USD"
    assert listed.movement == pb.MONEY_MOVEMENT_AUTHORIZE
    assert wire.micros(listed.recorded_at, "recorded_at") == jane[0][1]


@pytest.mark.parametrize(
    ("filters", "reason", "field"),
    [
        # A name in clear is never searched: it is not an id (nor a token).
        ({"customer": "Jane Example"}, "ID_INVALID", "customer"),
        ({"account_id": "acct 1"}, "ID_INVALID", "account_id"),
        ({"page_token": "garbled"}, "PAGE_TOKEN_INVALID", "page_token"),
        ({"page_size": -1}, "PAGE_SIZE_INVALID", "page_size"),
        ({"tenant_id": "nobody"}, "TENANT_NOT_FOUND", "tenant_id"),
    ],
)
async def test_bad_filters_are_refused_naming_the_field(
    engine: PolicyEngine, filters: dict[str, object], reason: str, field: str
) -> None:
    fields: dict[str, object] = {"tenant_id": TENANT, **filters}
    with pytest.raises(Exception) as caught:
        await decision_search.list_decisions(engine, pb.ListDecisionsRequest(**fields))  # type: ignore[arg-type]
    error = caught.value
    assert getattr(error, "reason", "") == reason and getattr(error, "field", "") == field


async def test_an_empty_window_is_refused(engine: PolicyEngine) -> None:
    stamp = wire.timestamp(1_800_000_000_000_000)
    with pytest.raises(InvalidArgument) as caught:
        await decision_search.list_decisions(
            engine, pb.ListDecisionsRequest(tenant_id=TENANT, start_time=stamp, end_time=stamp)
        )
    assert caught.value.reason == "WINDOW_INVALID" and caught.value.field == "end_time"


async def test_purged_decisions_leave_the_search(engine: PolicyEngine, clock: ManualClock) -> None:
    first, _ = await _decide(engine, clock, "old")
    clock.advance(3600.0)
    kept, _ = await _decide(engine, clock, "new")
    assert await _ids(engine) == [kept, first]
    purged = await asyncio.to_thread(engine.log.purge_expired, clock.now_us() - 60_000_000, 100)
    assert purged == 1
    assert await _ids(engine) == [kept]
    assert await _ids(engine, customer="cust-1") == [kept]


async def test_list_decisions_over_grpc(stubs: Stubs) -> None:
    made = [(await stubs.policy.Evaluate(request(f"ld-{i}"))).decision for i in range(3)]
    # The plane's clock stands still here: one log time, so newest first is
    # by id, descending.
    first = await stubs.policy.ListDecisions(
        pb.ListDecisionsRequest(tenant_id=TENANT, customer="cust-1", page_size=2)
    )
    rest = await stubs.policy.ListDecisions(
        pb.ListDecisionsRequest(
            tenant_id=TENANT, customer="cust-1", page_size=2, page_token=first.next_page_token
        )
    )
    listed_ids = [d.decision.decision_id for d in [*first.decisions, *rest.decisions]]
    assert listed_ids == sorted((d.decision_id for d in made), reverse=True)
    assert not rest.next_page_token
    answer = first
    made_by_id = {d.decision_id: d for d in made}
    listed = answer.decisions[0]
    assert listed.decision.fired_rules == made_by_id[listed.decision.decision_id].fired_rules
    assert listed.customer_name_token.startswith("ptok_name_")
    assert "Jane Example" not in str(answer)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.policy.ListDecisions(
            pb.ListDecisionsRequest(tenant_id=TENANT, customer="Jane Example")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_decisions_logged_before_the_index_are_indexed_at_start(
    any_engine: PolicyEngine, clock: ManualClock
) -> None:
    engine = any_engine
    made = [await _decide(engine, clock, f"old-{i}") for i in range(3)]
    newest_first = [d for d, _ in reversed(made)]
    # As a log written before decision_search existed: no search rows, and
    # no record of a backfill.
    await engine.log.stop()
    with engine.store.db.tx() as tx:
        tx.execute("DELETE FROM decision_search")
        tx.execute("DELETE FROM decision_search_backfill")
    assert await _ids(engine, customer="cust-1") == []
    assert await _ids(engine, decision_id=made[0][0]) == [made[0][0]]  # the log's own index

    # A start indexes them (in the background, a page at a time).
    engine.log.start()
    deadline = asyncio.get_running_loop().time() + 30.0
    while await _ids(engine, customer="cust-1") != newest_first:
        assert asyncio.get_running_loop().time() < deadline, "the backfill did not finish"
        await asyncio.sleep(0.05)
    token = engine.sealer.token(TENANT, "Jane Example")
    assert await _ids(engine, customer=token) == newest_first
    assert await _ids(engine, account_id="acct-1") == newest_first
    # Done once: the next pass finds the mark and reads nothing.
    assert engine.store.search_backfilled()
    with engine.store.db.tx() as tx:
        tx.execute("DELETE FROM decision_search WHERE decision_id = ?", (made[0][0],))
    assert await asyncio.to_thread(engine.log.backfill_search, 2) == 0


async def test_backfill_pages_and_leaves_indexed_rows_alone(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    made = [await _decide(engine, clock, f"pg-{i}") for i in range(5)]
    with engine.store.db.tx() as tx:
        # Two of five unindexed, one of them the last: pages of 1 reach both.
        tx.execute(
            "DELETE FROM decision_search WHERE decision_id IN (?, ?)", (made[1][0], made[4][0])
        )
        tx.execute("DELETE FROM decision_search_backfill")
    assert await asyncio.to_thread(engine.log.backfill_search, 1) == 2
    assert await _ids(engine, customer="cust-1") == [d for d, _ in reversed(made)]
