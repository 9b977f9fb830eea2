"""Papercuts a new user hit through the policy plane's public API, each
through the real gRPC server: the one tenant-id rule, bundle errors naming the
rule by its id, a withdrawal that keeps `granted_at`, the score of a sanctions
near miss, and CheckContact asked about a moment (21:30 in São Paulo, a DST
crossing) while the plane's own clock is elsewhere."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from policy_plane.bundle import SHIPPED_LISTS_DIR
from policy_plane.sanctions import Screener, parse_alt_csv, parse_sdn_csv
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.clock import ManualClock

from .conftest import START_US, TENANT, Stubs
from .test_grpc import DEFAULT_YAML, expect_error, request

BAD_TENANT_IDS = ["Upper.Case:x", "a.b", "a*", "a>", "a b", "acme\n"]


def utc_us(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp() * 1e6)


# ---------------------------------------------------------------- tenant ids


@pytest.mark.parametrize("tenant_id", BAD_TENANT_IDS)
async def test_tenant_ids_follow_the_rule_every_plane_applies(stubs: Stubs, tenant_id: str) -> None:
    """`Upper.Case:x` was accepted here and refused by the money plane; now
    the same INVALID_ARGUMENT, reason and field as there, for every RPC."""
    await expect_error(
        stubs.policy.CreateTenant(pb.CreateTenantRequest(tenant_id=tenant_id, display_name="x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "tenant_id",
    )
    await expect_error(
        stubs.policy.Evaluate(request("k-bad-tenant", tenant_id=tenant_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "tenant_id",
    )
    await expect_error(
        stubs.consent.GetConsent(pb.GetConsentRequest(tenant_id=tenant_id, customer_id="c")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "tenant_id",
    )


async def test_a_tenant_id_the_money_plane_accepts_is_accepted(stubs: Stubs) -> None:
    created = await stubs.policy.CreateTenant(
        pb.CreateTenantRequest(tenant_id="t-1_x", display_name="x")
    )
    assert created.tenant_id == "t-1_x"


async def test_a_nested_tenant_id_is_named_by_its_path(stubs: Stubs) -> None:
    """PutOffer and PutContactProfile carry the tenant inside a message: the
    error names `offer.tenant_id` / `profile.tenant_id`, the caller's field."""
    await expect_error(
        stubs.offers.PutOffer(
            pb.PutOfferRequest(offer=pb.Offer(tenant_id="Bad.Tenant", offer_id="o1"))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TENANT_ID",
        "offer.tenant_id",
    )
    await expect_error(
        stubs.offers.PutOffer(
            pb.PutOfferRequest(offer=pb.Offer(tenant_id="nobody", offer_id="o1"))
        ),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
        "offer.tenant_id",
    )
    await expect_error(
        stubs.consent.PutContactProfile(
            pb.PutContactProfileRequest(
                profile=pb.ContactProfile(tenant_id=TENANT, customer_id="bad id")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ID_INVALID",
        "profile.customer_id",
    )


# ---------------------------------------------------------------- bundle errors


DAILY = "snapshot.velocity.account.amount_minor_24h + request.amount_minor > limits.daily_minor"


@pytest.mark.parametrize(
    ("old", "new", "reason", "field"),
    [
        # An unknown field in the CEL of one rule.
        (DAILY, DAILY.replace("24h", "25h"), "RULE_UNKNOWN_FIELD", "rules[kyc_daily_limit].when"),
        # A condition that is not a boolean.
        (
            DAILY,
            DAILY.replace(" > limits.daily_minor", ""),
            "RULE_TYPE_ERROR",
            "rules[kyc_daily_limit].when",
        ),
        # Not CEL at all.
        (
            "when: sanctions.hit\n",
            "when: sanctions.hit &&\n",
            "RULE_SYNTAX_ERROR",
            "rules[sanctions_hit].when",
        ),
        # The rule's own fields.
        (
            "reason_code: SANCTIONS_HIT\n",
            "reason_code: sanctions_hit\n",
            "RULE_REASON_CODE_INVALID",
            "rules[sanctions_hit].reason_code",
        ),
    ],
)
async def test_bundle_errors_name_the_rule_by_its_id(
    stubs: Stubs, old: str, new: str, reason: str, field: str
) -> None:
    """As the README says: the rule named, by its id (not its position)."""
    assert DEFAULT_YAML.count(old) == 1, old
    await expect_error(
        stubs.bundles.LoadBundle(
            pb.LoadBundleRequest(
                content=DEFAULT_YAML.replace(old, new), target=pb.BUNDLE_TARGET_LIVE
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        field,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.bundles.LoadBundle(pb.LoadBundleRequest(content=DEFAULT_YAML.replace(old, new)))
    rule = field.split("]")[0] + "]"
    assert (caught.value.details() or "").startswith(rule), caught.value.details()


# ---------------------------------------------------------------- consent


async def test_withdrawing_consent_keeps_granted_at(stubs: Stubs, clock: ManualClock) -> None:
    def consent(status: pb.ConsentStatus.ValueType) -> pb.SetConsentRequest:
        return pb.SetConsentRequest(
            tenant_id=TENANT,
            customer_id="cu-withdraw",
            consent=pb.Consent(
                channel=pb.CHANNEL_EMAIL,
                topic=pb.TOPIC_MARKETING,
                status=status,
                lawful_basis=pb.LAWFUL_BASIS_CONSENT,
                source="app_settings",
            ),
        )

    clock.set_us(START_US)
    granted = (await stubs.consent.SetConsent(consent(pb.CONSENT_STATUS_GRANTED))).consent
    assert granted.granted_at.ToMicroseconds() == START_US
    clock.advance(86_400)
    withdrawn = (await stubs.consent.SetConsent(consent(pb.CONSENT_STATUS_WITHDRAWN))).consent
    assert withdrawn.status == pb.CONSENT_STATUS_WITHDRAWN
    assert withdrawn.granted_at.ToMicroseconds() == START_US
    assert withdrawn.updated_at.ToMicroseconds() == START_US + 86_400_000_000
    [stored] = (
        await stubs.consent.GetConsent(
            pb.GetConsentRequest(tenant_id=TENANT, customer_id="cu-withdraw")
        )
    ).consents
    assert stored.granted_at.ToMicroseconds() == START_US
    # Granted again later: a new grant, with its own time.
    clock.advance(86_400)
    again = (await stubs.consent.SetConsent(consent(pb.CONSENT_STATUS_GRANTED))).consent
    assert again.granted_at.ToMicroseconds() == START_US + 2 * 86_400_000_000


# ---------------------------------------------------------------- sanctions


def _shipped_screener() -> Screener:
    entries = parse_sdn_csv((SHIPPED_LISTS_DIR / "sdn_sample.csv").read_text(), 1000, 512)
    aliases = parse_alt_csv((SHIPPED_LISTS_DIR / "alt_sample.csv").read_text(), 1000, 512)
    return Screener(entries, aliases, 92.0, 80.0, frozenset())


async def test_a_sanctions_near_miss_reports_its_score(stubs: Stubs) -> None:
    # Like VOLKOV, Dmitry: the given name matches, the family name does not.
    near = "Dmitri Volkonsky"
    expected, _ = _shipped_screener().match(near)
    assert 0 < expected < 80, expected
    evaluate = request("k-near-miss")
    evaluate.payment.counterparty.name = near
    decision = (await stubs.policy.Evaluate(evaluate)).decision
    screening = decision.sanctions
    assert screening.best_score == pytest.approx(expected, abs=1e-3)
    assert not screening.hit and not screening.possible_match
    # A near miss names no entry: it is a score, not a match.
    assert screening.matched_entry_id == "" and screening.matched_name == ""
    assert decision.outcome == pb.OUTCOME_ALLOW
    # A possible match still names its entry.
    close = request("k-possible-match")
    close.payment.counterparty.name = "Jorge Mendoza"
    matched = (await stubs.policy.Evaluate(close)).decision.sanctions
    assert matched.possible_match and matched.matched_name == "MENDOZA QUINTERO, Jorge Luis"


# ---------------------------------------------------------------- contact moment


async def _customer(stubs: Stubs, customer_id: str, time_zone: str) -> None:
    await stubs.consent.PutContactProfile(
        pb.PutContactProfileRequest(
            profile=pb.ContactProfile(
                tenant_id=TENANT, customer_id=customer_id, time_zone=time_zone
            )
        )
    )
    await stubs.consent.SetConsent(
        pb.SetConsentRequest(
            tenant_id=TENANT,
            customer_id=customer_id,
            consent=pb.Consent(
                channel=pb.CHANNEL_PUSH,
                topic=pb.TOPIC_MARKETING,
                status=pb.CONSENT_STATUS_GRANTED,
                lawful_basis=pb.LAWFUL_BASIS_CONSENT,
            ),
        )
    )


async def _check_at(stubs: Stubs, customer_id: str, at_us: int) -> pb.CheckContactResponse:
    check = pb.CheckContactRequest(
        tenant_id=TENANT,
        customer_id=customer_id,
        channel=pb.CHANNEL_PUSH,
        topic=pb.TOPIC_MARKETING,
    )
    check.contact_at.FromMicroseconds(at_us)
    answer: pb.CheckContactResponse = await stubs.consent.CheckContact(check)
    return answer


async def test_check_contact_at_21_30_in_sao_paulo(stubs: Stubs, clock: ManualClock) -> None:
    # The plane's clock: 2026-06-01 12:00 UTC, 09:00 in São Paulo (UTC-3).
    clock.set_us(START_US)
    await _customer(stubs, "cu-sp", "America/Sao_Paulo")
    now = await stubs.consent.CheckContact(
        pb.CheckContactRequest(
            tenant_id=TENANT, customer_id="cu-sp", channel=pb.CHANNEL_PUSH, topic=pb.TOPIC_MARKETING
        )
    )
    assert now.allowed, "unset: now, 09:00 there"
    evening = await _check_at(stubs, "cu-sp", utc_us(2026, 6, 2, 0, 30))  # 21:30 there
    assert not evening.allowed and evening.block == pb.CONTACT_BLOCK_QUIET_HOURS
    assert evening.next_allowed_at.ToMicroseconds() == utc_us(2026, 6, 2, 11)  # 08:00 there
    afternoon = await _check_at(stubs, "cu-sp", utc_us(2026, 6, 1, 23, 59))  # 20:59 there
    assert afternoon.allowed


@pytest.mark.parametrize(
    ("time_zone", "at_us", "resume_us"),
    [
        # New York the day before spring-forward (EST, UTC-5): 12:30 UTC is 07:30.
        ("America/New_York", utc_us(2026, 3, 7, 12, 30), utc_us(2026, 3, 7, 13)),
        # The day after the change (EDT, UTC-4), the same UTC time is 08:30: allowed.
        ("America/New_York", utc_us(2026, 3, 8, 12, 30), 0),
        # London, the evening before fall-back (BST): quiet until 08:00 GMT = 08:00 UTC.
        ("Europe/London", utc_us(2026, 10, 24, 20, 30), utc_us(2026, 10, 25, 8)),
    ],
)
async def test_check_contact_across_a_dst_change(
    stubs: Stubs, clock: ManualClock, time_zone: str, at_us: int, resume_us: int
) -> None:
    clock.set_us(START_US)  # June: neither moment is the plane's now
    await _customer(stubs, "cu-dst", time_zone)
    answer = await _check_at(stubs, "cu-dst", at_us)
    assert answer.allowed is (resume_us == 0)
    if resume_us:
        assert answer.block == pb.CONTACT_BLOCK_QUIET_HOURS
        assert answer.next_allowed_at.ToMicroseconds() == resume_us


async def test_check_contact_refuses_a_moment_before_1970(stubs: Stubs) -> None:
    await _customer(stubs, "cu-old", "UTC")
    check = pb.CheckContactRequest(
        tenant_id=TENANT, customer_id="cu-old", channel=pb.CHANNEL_PUSH, topic=pb.TOPIC_MARKETING
    )
    check.contact_at.FromSeconds(-60)
    await expect_error(
        stubs.consent.CheckContact(check),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TIME_INVALID",
        "contact_at",
    )
