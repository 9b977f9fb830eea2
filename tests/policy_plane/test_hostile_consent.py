"""The consent book holds its customers in memory (CheckContact answers from
memory alone), so their number is bounded (policy.limits.max_consent_customers):
a write for one customer more is refused before it is stored, the customers
already held stay writable, and a store that holds more stops the plane at
start, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_plane.consent import ConsentRecord, ContactProfile, ContactRecord
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import ResourceExhausted

from .conftest import START_US, TENANT, make_config, started_engine


def _grant(channel: str = "email") -> ConsentRecord:
    return ConsentRecord(
        channel=channel, topic="marketing", status="granted", lawful_basis="consent"
    )


async def test_one_customer_more_than_the_bound_is_refused_and_nothing_is_stored(
    state_dir: Path,
) -> None:
    clock = ManualClock(START_US)
    config = make_config(state_dir, limits={"max_consent_customers": 2})
    engine = await started_engine(config, clock)
    try:
        book = engine.consent
        book.set_consent(TENANT, "c1", _grant())
        book.put_profile(ContactProfile(tenant_id=TENANT, customer_id="c2"))
        for write in (
            lambda: book.set_consent(TENANT, "c3", _grant()),
            lambda: book.put_profile(ContactProfile(tenant_id=TENANT, customer_id="c3")),
            lambda: book.record_contact(
                TENANT,
                "c3",
                ContactRecord(
                    contact_id="k3", channel="email", topic="marketing", at_us=clock.now_us()
                ),
            ),
        ):
            with pytest.raises(ResourceExhausted) as caught:
                write()
            assert (caught.value.reason, caught.value.field) == (
                "CONSENT_CUSTOMERS_FULL",
                "customer_id",
            )
        # Nothing of c3 reached the store; c1 and c2 are still writable.
        assert not [row for row in engine.store.all_consents() if row[1] == "c3"]
        assert not [row for row in engine.store.all_profiles() if row[1] == "c3"]
        book.set_consent(TENANT, "c2", _grant("sms"))
        assert book.check(TENANT, "c2", "sms", "marketing").allowed  # midday, granted
        assert book.check(TENANT, "c3", "sms", "marketing").block == "no_consent"
    finally:
        await engine.stop()
        engine.store.db.close()

    # A plane whose store holds more customers than its bound does not start.
    smaller = make_config(state_dir, limits={"max_consent_customers": 1})
    with pytest.raises(ResourceExhausted, match="max_consent_customers"):
        await started_engine(smaller, clock)
