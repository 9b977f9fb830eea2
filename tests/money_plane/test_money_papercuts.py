"""Papercuts a new user hit through the money plane's API: a transfer refused
only because its atomic batch failed keeps its key free, and the tenant id
follows the one rule every plane applies."""

from __future__ import annotations

import uuid

import pytest
from money_helpers import Kit

from triplane.runtime.errors import InvalidArgument


def key() -> str:
    return f"k-{uuid.uuid4().hex[:20]}"


async def test_a_linked_failure_leaves_its_key_free(kit: Kit) -> None:
    await kit.fund("alice", 100)
    good = kit.move(key(), "bank", "bob", 50)
    bad = kit.move(key(), "alice", "merchant", 500)
    before = kit.snapshot()
    outcomes = await kit.submit(good, bad, atomic=True)
    assert [o.error.reason if o.error else "" for o in outcomes] == [
        "LINKED_TRANSFER_FAILED",
        "INSUFFICIENT_FUNDS",
    ]
    assert kit.snapshot() == before
    # The neighbour's failure was not its own: alone, its key moves the money.
    alone = await kit.ok(good)
    assert not alone.replayed and alone.entry is not None
    assert (await kit.balance("bob"))[0] == 50
    # The transfer that failed on ledger state is remembered under its key: the
    # same answer again, even now that the money would be there.
    await kit.fund("alice", 1_000)
    [again] = await kit.submit(bad)
    assert again.replayed
    assert again.error is not None and again.error.reason == "INSUFFICIENT_FUNDS"
    entries = kit.probe.entries_by_key(kit.tenant)
    assert entries[good.idempotency_key] == 1 and bad.idempotency_key not in entries
    await kit.assert_balanced()


async def test_a_linked_failure_key_can_carry_another_request(kit: Kit) -> None:
    """Not remembered means not bound to its payload either: the key of a
    linked failure may carry a different transfer afterwards."""
    await kit.fund("alice", 10)
    linked = kit.move(key(), "bank", "bob", 50)
    await kit.submit(linked, kit.move(key(), "alice", "merchant", 500), atomic=True)
    other = kit.move(linked.idempotency_key, "bank", "bob", 70)
    done = await kit.ok(other)
    assert not done.replayed
    assert (await kit.balance("bob"))[0] == 70


@pytest.mark.parametrize("tenant_id", ["Upper.Case:x", "a.b", "a*", "a>", "a b"])
async def test_tenant_id_is_refused_as_every_plane_refuses_it(kit: Kit, tenant_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await kit.ledger.create_tenant(tenant_id, "x")
    assert (caught.value.reason, caught.value.field) == ("INVALID_TENANT_ID", "tenant_id")
