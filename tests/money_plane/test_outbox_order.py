"""The order the outbox relays events in, with no global sequence to number
them: (order_us, order_pos), where order_us is a hybrid clock kept on each
account row. Commits that change one account are relayed in commit order even
when the replica that committed later has a clock behind the earlier one's; a
commit's own events keep their order; postings are numbered per account."""

from __future__ import annotations

from money_helpers import NO_CONSTRAINT, Kit

from money_plane.domain import Side


async def test_commits_on_one_account_are_relayed_in_commit_order_whatever_the_clock(
    kit: Kit,
) -> None:
    now_us = kit.clock.now_us()
    await kit.fund("alice", 10_000)
    await kit.ok(kit.move("first", "alice", "merchant", 100))
    # The next commits come from a replica whose clock is 5 s behind: one on
    # alice, and one on two accounts that replica opens (no order is owed
    # between those and alice's).
    behind_us = now_us - 5_000_000
    kit.clock.set_us(behind_us)
    await kit.ok(kit.move("second", "alice", "bob", 200))
    await kit.open(("x1", "USD", NO_CONSTRAINT, 0), ("x2", "USD", NO_CONSTRAINT, 0))
    await kit.ok(kit.move("elsewhere", "x1", "x2", 300))

    rows = kit.probe.rows("SELECT event_id, created_at_us, order_us FROM outbox")
    created = {r[0]: r[1] for r in rows}
    relayed = [created[e.event_id] for e in kit.ledger.store.unsent(1_000)]
    assert len(relayed) == len(rows)
    # Stamped 5 s before everything else: x1 and x2 opened and the transfer
    # between them are relayed first, on that replica's clock; the transfer
    # on alice last, after every event stamped at now (alice's earlier
    # commits among them).
    assert relayed[:3] == [behind_us] * 3
    assert relayed[3:-1] == [now_us] * (len(relayed) - 4)
    assert relayed[-1] == behind_us
    order_us = sorted(r[2] for r in rows if r[1] == behind_us)
    assert order_us[:3] == [behind_us, behind_us, behind_us + 1]
    assert order_us[3] > max(r[2] for r in rows if r[1] == now_us)

    # Postings are numbered 1, 2, ... in each account, in commit order.
    alice = await kit.ledger.list_postings(kit.tenant, "alice", 10, 0)
    assert [(r.sequence, r.side, r.amount_minor) for r in alice] == [
        (1, Side.CREDIT, 10_000),
        (2, Side.DEBIT, 100),
        (3, Side.DEBIT, 200),
    ]
    x2 = await kit.ledger.list_postings(kit.tenant, "x2", 10, 0)
    assert [(r.sequence, r.amount_minor) for r in x2] == [(1, 300)]
    await kit.assert_balanced()


async def test_the_events_of_one_commit_keep_their_order(kit: Kit) -> None:
    await kit.fund("alice", 10_000)
    outcomes = await kit.submit(
        *[kit.move(f"batch-{i}", "alice", "merchant", 10 + i) for i in range(6)]
    )
    assert all(o.error is None for o in outcomes)
    rows = kit.probe.rows("SELECT event_id, order_us, order_pos FROM outbox")
    last_commit = max(r[1] for r in rows)
    position = {r[0]: r[2] for r in rows if r[1] == last_commit}
    relayed = [e.event_id for e in kit.ledger.store.unsent(1_000)]
    assert [position[e] for e in relayed if e in position] == [0, 1, 2, 3, 4, 5]
    merchant = await kit.ledger.list_postings(kit.tenant, "merchant", 10, 0)
    assert [r.amount_minor for r in merchant] == [10, 11, 12, 13, 14, 15]
    assert [r.sequence for r in merchant] == [1, 2, 3, 4, 5, 6]
