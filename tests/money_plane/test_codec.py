"""The hot-path protobuf builders write the same messages as keyword construction."""

from __future__ import annotations

import pytest

from money_plane import codec
from money_plane.domain import Entry, Outcome, Posting
from triplane.money.v1 import money_pb2 as pb
from triplane.runtime import codec as wire


def _by_keywords(value: Entry) -> pb.Entry:
    return pb.Entry(
        tenant_id=value.tenant_id,
        entry_id=value.entry_id,
        idempotency_key=value.idempotency_key,
        kind=value.kind,  # type: ignore[arg-type]
        postings=[codec.posting(p, value) for p in value.postings],
        posted_at=wire.timestamp(value.posted_at_us),
        hold_id=value.hold_id,
        refers_to_entry_id=value.refers_to_entry_id,
        amount=wire.money(value.amount_minor, value.currency),
        refunded_minor=value.refunded_minor,
        decision_id=value.decision_id,
        description=value.description,
        metadata=value.metadata,
    )


ENTRIES = [
    Entry(
        tenant_id="t1",
        entry_id="ent_0001",
        idempotency_key="k-1",
        kind=1,
        postings=[
            Posting(account_id="a", side=1, amount_minor=700, currency="USD"),
            Posting(account_id="b", side=2, amount_minor=500, currency="USD"),
            Posting(account_id="c", side=2, amount_minor=200, currency="USD", label="fee"),
        ],
        posted_at_us=1_767_225_600_123_456,
        amount_minor=700,
        currency="USD",
        decision_id="dec-1",
        description="coffee",
        metadata={"order": "42", "channel": "web"},
    ),
    # Every field at its zero value: presence of the sub-messages must match.
    Entry(
        tenant_id="",
        entry_id="",
        idempotency_key="",
        kind=0,
        postings=[Posting(account_id="", side=0, amount_minor=0, currency="")],
        posted_at_us=0,
        amount_minor=0,
        currency="",
    ),
    # Before the epoch (floor division), no postings, refund fields.
    Entry(
        tenant_id="t",
        entry_id="e",
        idempotency_key="k",
        kind=5,
        postings=[],
        posted_at_us=-1_500_001,
        amount_minor=9,
        currency="JPY",
        hold_id="h",
        refers_to_entry_id="r",
        refunded_minor=3,
    ),
]


@pytest.mark.parametrize("value", ENTRIES)
def test_entry_matches_keyword_construction(value: Entry) -> None:
    fast = codec.entry(value)
    slow = _by_keywords(value)
    assert fast == slow
    assert fast.SerializeToString(deterministic=True) == slow.SerializeToString(deterministic=True)
    result = codec.result(3, Outcome(entry=value, replayed=True))
    assert result == pb.TransferResult(index=3, entry=slow, replayed=True)
