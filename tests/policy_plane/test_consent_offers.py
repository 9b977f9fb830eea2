"""Consent and contact policy (quiet hours across time zones and DST, caps,
cooldowns, vulnerability, opt-out) and offer eligibility with reasons."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from policy_plane.consent import ConsentRecord, ContactProfile, ContactRecord
from policy_plane.engine import PolicyEngine
from policy_plane.offers import CustomerContext, OfferEntry
from triplane.runtime.clock import ManualClock
from triplane.runtime.db import DatabaseClosed
from triplane.runtime.errors import InvalidArgument

from .conftest import TENANT, make_config, started_engine

UTC = dt.UTC


def at(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1_000_000)


def grant(
    engine: PolicyEngine, customer: str, channel: str = "push", topic: str = "marketing"
) -> None:
    engine.consent.set_consent(
        TENANT,
        customer,
        ConsentRecord(channel=channel, topic=topic, status="granted", lawful_basis="consent"),
    )


def profile(engine: PolicyEngine, customer: str, tz: str = "", vulnerable: bool = False) -> None:
    engine.consent.put_profile(
        ContactProfile(tenant_id=TENANT, customer_id=customer, time_zone=tz, vulnerable=vulnerable)
    )


@pytest.mark.parametrize(
    ("tz", "now_us", "quiet", "resume_us"),
    [
        # New York, the day before spring-forward (EST, UTC-5): 07:30 local.
        ("America/New_York", at(2026, 3, 7, 12, 30), True, at(2026, 3, 7, 13)),
        # The day after (EDT, UTC-4): the same UTC instant is 08:30 local.
        ("America/New_York", at(2026, 3, 9, 12, 30), False, 0),
        # During the spring-forward night: quiet ends at 08:00 EDT = 12:00 UTC.
        ("America/New_York", at(2026, 3, 8, 6), True, at(2026, 3, 8, 12)),
        # London fall-back night (BST -> GMT): quiet ends at 08:00 GMT = 08:00 UTC.
        ("Europe/London", at(2026, 10, 24, 21, 30), True, at(2026, 10, 25, 8)),
        ("Europe/London", at(2026, 10, 24, 19, 59), False, 0),
        # Tokyo (no DST): 21:00 JST is 12:00 UTC.
        ("Asia/Tokyo", at(2026, 6, 1, 12), True, at(2026, 6, 1, 23)),
        ("Asia/Tokyo", at(2026, 6, 1, 11, 59), False, 0),
        # No time zone on file: the configured default (UTC).
        ("", at(2026, 6, 1, 7, 59), True, at(2026, 6, 1, 8)),
    ],
)
async def test_quiet_hours_in_the_customers_zone(
    engine: PolicyEngine, clock: ManualClock, tz: str, now_us: int, quiet: bool, resume_us: int
) -> None:
    profile(engine, "c1", tz)
    grant(engine, "c1")
    clock.set_us(now_us)
    check = engine.consent.check(TENANT, "c1", "push", "marketing")
    assert check.allowed is not quiet
    if quiet:
        assert check.block == "quiet_hours"
        assert check.next_allowed_at_us == resume_us
        local = dt.datetime.fromtimestamp(resume_us / 1e6, ZoneInfo(tz or "UTC"))
        assert (local.hour, local.minute) == (8, 0)
    # Servicing messages are not held back by quiet hours and need no grant.
    assert engine.consent.check(TENANT, "c1", "push", "servicing").allowed


async def test_opt_out_is_honoured_from_the_next_decision(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    clock.set_us(at(2026, 6, 1, 12))
    assert engine.consent.check(TENANT, "c2", "email", "marketing").block == "no_consent"
    grant(engine, "c2", "email")
    assert engine.consent.check(TENANT, "c2", "email", "marketing").allowed
    engine.consent.set_consent(
        TENANT,
        "c2",
        ConsentRecord(
            channel="email", topic="marketing", status="withdrawn", lawful_basis="consent"
        ),
    )
    assert engine.consent.check(TENANT, "c2", "email", "marketing").block == "no_consent"
    engine.consent.set_consent(
        TENANT,
        "c2",
        ConsentRecord(
            channel="sms", topic="servicing", status="withdrawn", lawful_basis="contract"
        ),
    )
    assert not engine.consent.check(TENANT, "c2", "sms", "servicing").allowed
    _, consents = engine.consent.get(TENANT, "c2")
    assert {(c.channel, c.status) for c in consents} == {
        ("email", "withdrawn"),
        ("sms", "withdrawn"),
    }
    assert all(c.updated_at_us == clock.now_us() for c in consents)


async def test_caps_cooldowns_and_vulnerable_gating(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    clock.set_us(at(2026, 6, 1, 12))
    for channel in ("push", "email", "sms"):
        grant(engine, "c3", channel)
    contact = lambda cid, channel, offer="": ContactRecord(  # noqa: E731
        contact_id=cid, channel=channel, topic="marketing", offer_id=offer, at_us=clock.now_us()
    )
    assert not engine.consent.record_contact(TENANT, "c3", contact("m1", "push", "o1"))
    assert engine.consent.record_contact(TENANT, "c3", contact("m1", "push", "o1"))  # idempotent
    assert (
        engine.consent.check(TENANT, "c3", "email", "marketing", "o1").block == "capped"
    )  # cooldown
    assert engine.consent.check(TENANT, "c3", "email", "marketing", "o2").allowed
    engine.consent.record_contact(TENANT, "c3", contact("m2", "push"))
    assert engine.consent.check(TENANT, "c3", "push", "marketing").block == "capped"  # per channel
    engine.consent.record_contact(TENANT, "c3", contact("m3", "email"))
    assert engine.consent.check(TENANT, "c3", "sms", "marketing").block == "capped"  # per day
    clock.advance(86_401)
    assert engine.consent.check(TENANT, "c3", "sms", "marketing").allowed
    profile(engine, "c3", vulnerable=True)
    assert engine.consent.check(TENANT, "c3", "sms", "marketing").block == "vulnerable"


async def test_consent_survives_a_restart(state_dir: Path, clock: ManualClock) -> None:
    clock.set_us(at(2026, 6, 1, 12))
    first = await started_engine(make_config(state_dir), clock)
    profile(first, "c4", "Europe/Paris")
    grant(first, "c4", "whatsapp")
    first.consent.record_contact(
        TENANT,
        "c4",
        ContactRecord(
            contact_id="x",
            channel="whatsapp",
            topic="marketing",
            offer_id="o9",
            at_us=clock.now_us(),
        ),
    )
    await first.stop()
    first.store.db.close()
    second = await started_engine(make_config(state_dir), clock)
    assert second.consent.profile(TENANT, "c4").time_zone == "Europe/Paris"
    assert second.consent.check(TENANT, "c4", "whatsapp", "marketing", "o9").block == "capped"
    await second.stop()
    second.store.db.close()


async def test_bad_consent_input_is_refused(engine: PolicyEngine) -> None:
    with pytest.raises(InvalidArgument) as caught:
        profile(engine, "c5", "Mars/Olympus_Mons")
    assert caught.value.field == "profile.time_zone"
    with pytest.raises(InvalidArgument) as caught:
        engine.consent.set_consent(
            TENANT,
            "c5",
            ConsentRecord(
                channel="pigeon", topic="marketing", status="granted", lawful_basis="consent"
            ),
        )
    assert caught.value.field == "consent.channel"


async def test_contact_checks_read_the_store_so_another_writers_changes_apply_at_once(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    """Nothing of consent is held in memory (replicas share it through the
    store): what another writer stored, with no call through this engine, is
    this engine's next answer; with the store gone a check fails rather than
    answer from what it once read, and a write changes nothing."""
    clock.set_us(at(2026, 6, 1, 12))
    profile(engine, "bulk7", "Europe/Paris")
    grant(engine, "bulk7", "push")
    assert engine.consent.check(TENANT, "bulk7", "push", "marketing").allowed
    # Another replica's opt-out, straight into the shared store.
    withdrawn = ConsentRecord(
        channel="push", topic="marketing", status="withdrawn", lawful_basis="consent"
    )
    engine.store.put_consent(
        TENANT, "bulk7", "push", "marketing", msgspec.json.encode(withdrawn).decode()
    )
    assert engine.consent.check(TENANT, "bulk7", "push", "marketing").block == "no_consent"
    # Another replica's contacts count against this one's caps.
    grant(engine, "bulk8", "sms")
    for index in range(2):
        contact = ContactRecord(
            contact_id=f"k{index}", channel="sms", topic="marketing", at_us=clock.now_us()
        )
        engine.store.insert_contact(
            TENANT, f"k{index}", "bulk8", msgspec.json.encode(contact).decode(), clock.now_us()
        )
    assert engine.consent.check(TENANT, "bulk8", "sms", "marketing").block == "capped"
    engine.store.db.close()
    with pytest.raises(DatabaseClosed):
        engine.consent.check(TENANT, "bulk7", "push", "marketing")
    with pytest.raises(DatabaseClosed):
        grant(engine, "bulk10", "push")


def offer(offer_id: str, **fields: object) -> OfferEntry:
    base: dict[str, object] = {
        "tenant_id": TENANT,
        "offer_id": offer_id,
        "product": "cashback",
        "value_minor": 500,
        "currency": "USD",
        "channels": ["push", "email"],
    }
    base.update(fields)
    return OfferEntry(**base)  # type: ignore[arg-type]


async def test_eligible_offers_with_a_reason_for_each_excluded_one(
    engine: PolicyEngine, clock: ManualClock
) -> None:
    clock.set_us(at(2026, 6, 1, 12))
    profile(engine, "c6", "Europe/Paris")
    grant(engine, "c6", "push")
    grant(engine, "c6", "email", "credit")
    catalog = engine.offers
    catalog.put(offer("cash", eligibility="context.spend_30d > 100.0", variants={}))
    catalog.put(offer("rich_only", eligibility="customer.kyc_tier >= 3"))
    catalog.put(offer("eu_only", regions=["FR"]))
    catalog.put(offer("us_only", regions=["US"]))
    catalog.put(offer("insure", product="insurance_cover", topic="insurance"))
    catalog.put(offer("bnpl", product="bnpl", topic="credit", channels=["email"]))
    catalog.put(offer("hidden", never_show="context.complaints > 0.0"))
    catalog.put(offer("stopped"))
    catalog.stop(TENANT, "stopped")
    ctx = CustomerContext(
        TENANT, "c6", "partner-a", "FR", 2, {"spend_30d": 250.0, "complaints": 1.0}
    )
    eligible, excluded = catalog.eligible(ctx)
    assert {(e.entry.offer_id, e.channel) for e in eligible} == {
        ("cash", "push"),
        ("eu_only", "push"),
        ("bnpl", "email"),
    }
    reasons = {x.offer_id: x.reason for x in excluded}
    assert reasons == {
        "rich_only": "not_eligible",
        "us_only": "not_eligible",
        "insure": "no_consent",
        "hidden": "suppressed",
        "stopped": "not_eligible",
    }
    # Change an offer (a new revision) and launch one: no restart.
    changed = catalog.put(offer("rich_only", eligibility="customer.kyc_tier >= 2"))
    assert changed.revision == 2
    assert "rich_only" in {e.entry.offer_id for e in catalog.eligible(ctx)[0]}
    # Vulnerable customers: no credit products; in the evening, quiet hours.
    profile(engine, "c6", "Europe/Paris", vulnerable=True)
    clock.set_us(at(2026, 6, 1, 20))  # 22:00 in Paris
    _, excluded = catalog.eligible(ctx)
    reasons = {x.offer_id: x.reason for x in excluded}
    assert reasons["bnpl"] == "suppressed"
    assert reasons["cash"] == "suppressed"  # marketing is blocked for vulnerable customers
    profile(engine, "c6", "Europe/Paris", vulnerable=False)
    _, excluded = catalog.eligible(ctx)
    assert {x.offer_id: x.reason for x in excluded}["cash"] == "quiet_hours"


async def test_bad_offers_are_refused(engine: PolicyEngine) -> None:
    for bad, field in [
        (offer("x", product="lottery"), "offer.product"),
        (offer("x", channels=[]), "offer.channels"),
        (offer("x", channels=["fax"]), "offer.channels[0]"),
        (offer("x", eligibility="customer.shoe_size > 3"), "offer.eligibility"),
        (offer("x", eligibility="customer.kyc_tier >"), "offer.eligibility"),
        (offer("x", regions=["France"]), "offer.regions[0]"),
        (offer("bad id!"), "offer.offer_id"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            engine.offers.put(bad)
        assert caught.value.field == field
    assert engine.offers.list_offers(TENANT, "", 10) == []


def test_a_time_zone_name_too_long_for_a_file_is_unknown_not_internal() -> None:
    """zoneinfo opens the name as a file: past 255 characters it raises
    OSError (file name too long), which answered INTERNAL (found by the fuzz
    suite through PutContactProfile)."""
    from policy_plane.consent import zone
    from triplane.runtime.errors import InvalidArgument as _InvalidArgument

    for name in ("A" * 256, "Europe/" + "x" * 2001):
        with pytest.raises(_InvalidArgument) as caught:
            zone(name, "profile.time_zone")
        assert (caught.value.reason, caught.value.field) == (
            "TIME_ZONE_UNKNOWN",
            "profile.time_zone",
        )
