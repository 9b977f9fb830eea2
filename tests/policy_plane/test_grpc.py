"""Through the real gRPC server (and real NATS): decisions, statuses, hot
reload under load, shadow mode, review cases with their NATS events, consent
and offers, replay and verification."""

from __future__ import annotations

import asyncio
import logging

import grpc
import msgspec
import nats
import pytest

from policy_plane import bundle_sync
from policy_plane.app import PolicyPlane
from policy_plane.bundle import BundleSource, shipped_default_path
from triplane.common.v1 import envelope_pb2, types_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import PermissionDenied
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tokens import Movement, TokenVerifier, load_public_keys

from .conftest import OTHER_TENANT, TENANT, Stubs

DEFAULT_YAML = shipped_default_path().read_text()


def request(
    key: str, amount_minor: int = 2_500, score: float = 0.1, tenant_id: str = TENANT
) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        tenant_id=tenant_id,
        idempotency_key=key,
        payment=pb.Payment(
            account_id="acct-1",
            credit_account_id="merchant-1",
            kind=pb.PAYMENT_KIND_PURCHASE,
            amount=types_pb2.Money(amount_minor=amount_minor, currency="USD"),
            merchant_id="m-1",
            merchant_category="5411",
            customer=pb.Party(name="Jane Example", country="US"),
            counterparty=pb.Party(name="Corner Shop", country="US"),
            customer_id="cust-1",
        ),
        snapshot=pb.ContextSnapshot(
            kyc=pb.KycInfo(tier=2, country="US"),
            model_score=types_pb2.ModelScoreRef(
                model="payment_risk", version="3", source="triton", score=score
            ),
            account_age_days=400,
        ),
    )


def money_plane_verifier(plane: PolicyPlane) -> TokenVerifier:
    """A verifier with the public keys the money plane loads from this config."""
    return TokenVerifier(
        load_public_keys(plane.config.keys.policy_public_keys, plane.config.state_path)
    )


def hold_of(key: str, amount_minor: int = 2_500, **terms: object) -> Movement:
    """The hold the gateway places for request(key): what the token must name."""
    movement = Movement(
        tenant_id=TENANT,
        kind="authorize",
        debit_account_id="acct-1",
        credit_account_id="merchant-1",
        amount_minor=amount_minor,
        currency="USD",
        idempotency_key=key,
    )
    return msgspec.structs.replace(movement, **terms)


async def expect_error(call: object, code: grpc.StatusCode, reason: str, field: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    got_reason, got_field = parse_rpc_error(caught.value)
    assert got_reason == reason
    if field:
        assert got_field == field


async def test_evaluate_signs_a_token_the_money_plane_accepts(
    plane: PolicyPlane, stubs: Stubs, clock: ManualClock
) -> None:
    response = await stubs.policy.Evaluate(request("pay-1"))
    decision = response.decision
    assert decision.outcome == pb.OUTCOME_ALLOW and decision.decision_token
    assert decision.route.method == "wallet" and decision.bundle_version.startswith(
        "default-2026.1@"
    )
    claims = money_plane_verifier(plane).verify(
        decision.decision_token,
        field="decision_token",
        movement=hold_of("pay-1"),
        now_us=clock.now_us(),
    )
    assert decision.token_id == claims.token_id
    assert money_plane_verifier(plane).keys.key_ids() == [decision.token_key_id]
    assert (claims.decision_id, claims.policy_version) == (
        decision.decision_id,
        decision.bundle_version,
    )
    assert claims.expires_at_s == (clock.now_us() // 1_000_000 + plane.config.policy.token_ttl_s)
    # The claims bind the payment: the same token for another amount is refused.
    with pytest.raises(PermissionDenied) as caught:
        money_plane_verifier(plane).verify(
            decision.decision_token,
            field="decision_token",
            movement=hold_of("pay-1", amount_minor=2_501),
            now_us=clock.now_us(),
        )
    assert (caught.value.reason, caught.value.field) == (
        "DECISION_TOKEN_MISMATCH",
        "decision_token.amount_minor",
    )
    again = await stubs.policy.Evaluate(request("pay-1"))
    assert again.replayed and again.decision == decision
    fetched = await stubs.policy.GetDecision(
        pb.GetDecisionRequest(tenant_id=TENANT, decision_id=decision.decision_id)
    )
    assert fetched.input.payment.amount.amount_minor == 2_500
    assert fetched.input.snapshot.decided_at.seconds == clock.now_us() // 1_000_000


async def test_bad_requests_get_the_right_status(stubs: Stubs) -> None:
    await expect_error(
        stubs.policy.Evaluate(request("x", tenant_id="nobody")),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
        "tenant_id",
    )
    await expect_error(
        stubs.policy.Evaluate(request("x", amount_minor=-5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "AMOUNT_NOT_POSITIVE",
        "payment.amount.amount_minor",
    )
    bad_kind = request("x")
    bad_kind.payment.kind = pb.PAYMENT_KIND_UNSPECIFIED
    await expect_error(
        stubs.policy.Evaluate(bad_kind),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYMENT_KIND_INVALID",
        "payment.kind",
    )
    await stubs.policy.Evaluate(request("dup"))
    await expect_error(
        stubs.policy.Evaluate(request("dup", amount_minor=3_000)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        "payment.amount.amount_minor",
    )
    mine = (await stubs.policy.Evaluate(request("mine"))).decision
    await expect_error(
        stubs.policy.GetDecision(
            pb.GetDecisionRequest(tenant_id=OTHER_TENANT, decision_id=mine.decision_id)
        ),
        grpc.StatusCode.NOT_FOUND,
        "DECISION_NOT_FOUND",
    )
    await expect_error(
        stubs.cases.ListCases(pb.ListCasesRequest(tenant_id=TENANT, page_size=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_SIZE_INVALID",
        "page_size",
    )
    verify = await stubs.policy.VerifyDecisionLog(pb.VerifyDecisionLogRequest())
    assert verify.valid and verify.records_checked == 2  # "dup" and "mine": nothing else


async def test_bad_bundle_is_refused_and_the_live_one_stays(stubs: Stubs) -> None:
    before = await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
    broken = DEFAULT_YAML.replace("when: sanctions.hit", "when: sanctions.hitt")
    await expect_error(
        stubs.bundles.LoadBundle(
            pb.LoadBundleRequest(content=broken, target=pb.BUNDLE_TARGET_LIVE)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RULE_UNKNOWN_FIELD",
        "rules[sanctions_hit].when",
    )
    # A target number the contract does not declare (found by the fuzz suite:
    # it answered INTERNAL).
    await expect_error(
        stubs.bundles.LoadBundle(pb.LoadBundleRequest(content=DEFAULT_YAML, target=17)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "BUNDLE_TARGET_UNKNOWN",
        "target",
    )
    await expect_error(
        stubs.bundles.ActivateBundle(pb.ActivateBundleRequest(version="nope@0")),
        grpc.StatusCode.NOT_FOUND,
        "BUNDLE_VERSION_NOT_FOUND",
    )
    after = await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
    assert after.live == before.live
    listed = await stubs.bundles.ListBundles(pb.ListBundlesRequest(page_size=10))
    assert [b.version for b in listed.bundles] == [before.live.version]


async def test_hot_reload_under_concurrent_evaluate_never_fails_a_request(stubs: Stubs) -> None:
    strict_yaml = DEFAULT_YAML.replace("score_review: 0.70", "score_review: 0.05")
    strict = (
        await stubs.bundles.LoadBundle(pb.LoadBundleRequest(content=strict_yaml, label="strict"))
    ).bundle
    default = (await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())).live
    flood_done = asyncio.Event()

    async def swap() -> list[pb.EvaluateResponse]:
        """Swaps the live bundle until the flood is answered (twice at least).
        After each swap a probe decides: an Evaluate that starts once
        ActivateBundle has returned must be decided by the bundle just made live."""
        probes: list[pb.EvaluateResponse] = []
        while not flood_done.is_set() or len(probes) < 2:
            version = strict.version if len(probes) % 2 == 0 else default.version
            await stubs.bundles.ActivateBundle(pb.ActivateBundleRequest(version=version))
            probe = await stubs.policy.Evaluate(request(f"hot-probe-{len(probes)}"))
            assert probe.decision.bundle_version == version, len(probes)
            probes.append(probe)
        return probes

    async def flood() -> list[pb.EvaluateResponse]:
        try:
            answers: list[pb.EvaluateResponse] = await asyncio.gather(
                *(stubs.policy.Evaluate(request(f"hot-{i}")) for i in range(150))
            )
            return answers
        finally:
            flood_done.set()

    probes, results = await asyncio.gather(swap(), flood())
    answered = [*results, *probes]
    # Both versions decided requests, and each decision is its bundle's.
    assert {r.decision.bundle_version for r in answered} == {strict.version, default.version}
    for result in answered:
        expected = (
            pb.OUTCOME_REVIEW
            if result.decision.bundle_version == strict.version
            else pb.OUTCOME_ALLOW
        )
        assert result.decision.outcome == expected
    assert (
        await stubs.policy.VerifyDecisionLog(pb.VerifyDecisionLogRequest())
    ).records_checked == len(answered)


async def test_shadow_mode_is_logged_never_enforced(stubs: Stubs) -> None:
    candidate_yaml = DEFAULT_YAML.replace("score_review: 0.70", "score_review: 0.30")
    loaded = await stubs.bundles.LoadBundle(
        pb.LoadBundleRequest(
            content=candidate_yaml, label="candidate", target=pb.BUNDLE_TARGET_SHADOW
        )
    )
    scores = [0.1, 0.2, 0.4, 0.45]
    for index, score in enumerate(scores):
        response = await stubs.policy.Evaluate(request(f"sh-{index}", score=score))
        assert response.decision.outcome == pb.OUTCOME_ALLOW  # live decides
    metrics = await stubs.policy.GetPolicyMetrics(pb.GetPolicyMetricsRequest(tenant_id=TENANT))
    assert metrics.shadow_bundle_version == loaded.bundle.version
    assert (metrics.shadow_decisions, metrics.shadow_agreements) == (4, 2)
    assert metrics.shadow_agreement_rate == 0.5
    await stubs.bundles.SetShadowBundle(pb.SetShadowBundleRequest(version=""))
    assert not (await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())).HasField("shadow")


async def test_review_cases_claim_resolve_event_and_overrule_rate(
    plane: PolicyPlane, stubs: Stubs, nats_url: str
) -> None:
    client = await nats.connect(nats_url)
    subscription = await client.subscribe(f"triplane.policy.{TENANT}.case.resolved")
    try:
        reviewed = [
            (await stubs.policy.Evaluate(request(f"rv-{i}", score=s))).decision
            for i, s in enumerate([0.75, 0.8])
        ]
        assert all(d.outcome == pb.OUTCOME_REVIEW and d.case_id for d in reviewed)
        listed = await stubs.cases.ListCases(
            pb.ListCasesRequest(tenant_id=TENANT, status=pb.CASE_STATUS_OPEN, page_size=1)
        )
        assert len(listed.cases) == 1 and listed.next_page_token
        rest = await stubs.cases.ListCases(
            pb.ListCasesRequest(
                tenant_id=TENANT, status=pb.CASE_STATUS_OPEN, page_token=listed.next_page_token
            )
        )
        assert len(rest.cases) == 1 and not rest.next_page_token
        first, second = reviewed
        await expect_error(
            stubs.cases.GetCase(pb.GetCaseRequest(tenant_id=OTHER_TENANT, case_id=first.case_id)),
            grpc.StatusCode.NOT_FOUND,
            "CASE_NOT_FOUND",
        )
        await expect_error(
            stubs.cases.ResolveCase(
                pb.ResolveCaseRequest(
                    tenant_id=TENANT,
                    case_id=first.case_id,
                    reviewer="ana",
                    resolution=pb.RESOLUTION_APPROVE,
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CASE_NOT_CLAIMED_BY_REVIEWER",
        )
        for decision, resolution in [
            (first, pb.RESOLUTION_APPROVE),
            (second, pb.RESOLUTION_DECLINE),
        ]:
            await stubs.cases.ClaimCase(
                pb.ClaimCaseRequest(tenant_id=TENANT, case_id=decision.case_id, reviewer="ana")
            )
            resolved = await stubs.cases.ResolveCase(
                pb.ResolveCaseRequest(
                    tenant_id=TENANT,
                    case_id=decision.case_id,
                    reviewer="ana",
                    resolution=resolution,
                    note="checked",
                )
            )
            assert resolved.case.status == pb.CASE_STATUS_RESOLVED
        await expect_error(
            stubs.cases.ClaimCase(
                pb.ClaimCaseRequest(tenant_id=TENANT, case_id=first.case_id, reviewer="bob")
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CASE_NOT_OPEN",
        )
        # The model suggested decline for both (score >= 0.7); one approval overrules it.
        metrics = await stubs.policy.GetPolicyMetrics(pb.GetPolicyMetricsRequest(tenant_id=TENANT))
        assert (metrics.cases_resolved_with_suggestion, metrics.cases_overruled) == (2, 1)
        assert metrics.human_overrule_rate == 0.5
        received = set()
        for _ in range(2):
            message = await subscription.next_msg(timeout=5)
            envelope = envelope_pb2.EventEnvelope.FromString(message.data)
            event = pb.CaseResolved.FromString(envelope.payload)
            assert envelope.event_type == "policy.case.resolved" and envelope.tenant_id == TENANT
            received.add((event.case.case_id, event.case.resolution, event.case.overruled))
        assert received == {
            (first.case_id, pb.RESOLUTION_APPROVE, True),
            (second.case_id, pb.RESOLUTION_DECLINE, False),
        }
    finally:
        await subscription.unsubscribe()
        await client.close()


async def _until_live(plane: PolicyPlane, label: str) -> None:
    for _ in range(200):
        live = plane.engine.bundles.live
        if live is not None and live.label == label:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"bundle {label!r} never went live")


async def test_bundle_rollout_through_nats_kv(
    plane: PolicyPlane, stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    assert plane.js is not None
    bundles = plane.config.policy.bundles

    async def publish(source: BundleSource) -> None:
        assert plane.js is not None
        await bundle_sync.publish_bundle(
            plane.js, bundles.kv_bucket, bundles.kv_key, source, 1_000_000
        )

    await publish(BundleSource(yaml_text=DEFAULT_YAML, label_override="fleet-rollout"))
    await _until_live(plane, "fleet-rollout")
    bad = BundleSource(
        yaml_text=DEFAULT_YAML.replace("outcome: deny", "outcome: nope", 1), label_override="bad"
    )
    with caplog.at_level(logging.ERROR, logger=bundle_sync.log.name):
        await publish(bad)
        # The watcher applies the key's values in order: once a good bundle
        # published after the bad one is live, the bad one was seen.
        await publish(BundleSource(yaml_text=DEFAULT_YAML, label_override="fleet-rollout-2"))
        await _until_live(plane, "fleet-rollout-2")
    refusals = [
        r.getMessage() for r in caplog.records if "bundle from NATS KV refused" in r.message
    ]
    assert len(refusals) == 1, refusals
    assert "nope" in refusals[0], refusals[0]
    listed = await stubs.bundles.ListBundles(pb.ListBundlesRequest(page_size=10))
    assert not [b.version for b in listed.bundles if b.version.startswith("bad@")]
    assert (await stubs.policy.Evaluate(request("after-kv"))).decision.bundle_version.startswith(
        "fleet-rollout-2@"
    )


async def test_consent_and_offers_over_grpc(stubs: Stubs, clock: ManualClock) -> None:
    clock.set_us(1_780_315_200_000_000)  # 12:00 UTC = 14:00 in Paris
    await stubs.consent.PutContactProfile(
        pb.PutContactProfileRequest(
            profile=pb.ContactProfile(
                tenant_id=TENANT, customer_id="cu-1", time_zone="Europe/Paris"
            )
        )
    )
    await expect_error(
        stubs.consent.PutContactProfile(
            pb.PutContactProfileRequest(
                profile=pb.ContactProfile(
                    tenant_id=TENANT, customer_id="cu-1", time_zone="Nowhere/City"
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TIME_ZONE_UNKNOWN",
        "profile.time_zone",
    )
    consent = pb.Consent(
        channel=pb.CHANNEL_PUSH,
        topic=pb.TOPIC_MARKETING,
        status=pb.CONSENT_STATUS_GRANTED,
        lawful_basis=pb.LAWFUL_BASIS_CONSENT,
        source="app",
    )
    await stubs.consent.SetConsent(
        pb.SetConsentRequest(tenant_id=TENANT, customer_id="cu-1", consent=consent)
    )
    check = await stubs.consent.CheckContact(
        pb.CheckContactRequest(
            tenant_id=TENANT, customer_id="cu-1", channel=pb.CHANNEL_PUSH, topic=pb.TOPIC_MARKETING
        )
    )
    assert check.allowed
    await expect_error(
        stubs.consent.CheckContact(
            pb.CheckContactRequest(tenant_id=TENANT, customer_id="cu-1", topic=pb.TOPIC_MARKETING)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CHANNEL_INVALID",
        "channel",
    )
    for index in range(3):
        await stubs.offers.PutOffer(
            pb.PutOfferRequest(
                offer=pb.Offer(
                    tenant_id=TENANT,
                    offer_id=f"offer-{index}",
                    product=pb.PRODUCT_CASHBACK,
                    value=types_pb2.Money(amount_minor=500, currency="USD"),
                    channels=[pb.CHANNEL_PUSH],
                    eligibility=f"context.spend > {index * 100}.0",
                )
            )
        )
    await stubs.offers.StopOffer(pb.StopOfferRequest(tenant_id=TENANT, offer_id="offer-0"))
    page = await stubs.offers.ListOffers(pb.ListOffersRequest(tenant_id=TENANT, page_size=2))
    assert [o.offer_id for o in page.offers] == ["offer-0", "offer-1"]
    page = await stubs.offers.ListOffers(
        pb.ListOffersRequest(tenant_id=TENANT, page_token=page.next_page_token)
    )
    assert [o.offer_id for o in page.offers] == ["offer-2"]
    answer = await stubs.offers.GetEligibleOffers(
        pb.GetEligibleOffersRequest(
            tenant_id=TENANT, customer_id="cu-1", region="FR", features={"spend": 150.0}
        )
    )
    assert [(e.offer_id, e.channel) for e in answer.eligible] == [("offer-1", pb.CHANNEL_PUSH)]
    assert {(x.offer_id, x.reason) for x in answer.excluded} == {
        ("offer-0", pb.EXCLUSION_REASON_NOT_ELIGIBLE),
        ("offer-2", pb.EXCLUSION_REASON_NOT_ELIGIBLE),
    }
    await stubs.consent.RecordContact(
        pb.RecordContactRequest(
            tenant_id=TENANT,
            customer_id="cu-1",
            contact_id="ct-1",
            channel=pb.CHANNEL_PUSH,
            topic=pb.TOPIC_MARKETING,
            offer_id="offer-1",
        )
    )
    answer = await stubs.offers.GetEligibleOffers(
        pb.GetEligibleOffersRequest(
            tenant_id=TENANT, customer_id="cu-1", region="FR", features={"spend": 150.0}
        )
    )
    assert (("offer-1", pb.EXCLUSION_REASON_CAPPED)) in {
        (x.offer_id, x.reason) for x in answer.excluded
    }
    await expect_error(
        stubs.offers.GetEligibleOffers(
            pb.GetEligibleOffersRequest(tenant_id="nobody", customer_id="cu-1")
        ),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )


async def test_replay_and_label_over_grpc(
    plane: PolicyPlane, stubs: Stubs, clock: ManualClock
) -> None:
    decisions = [
        (await stubs.policy.Evaluate(request(f"rp-{i}", score=0.1 + i * 0.2))).decision
        for i in range(4)
    ]
    await stubs.policy.LabelDecision(
        pb.LabelDecisionRequest(
            tenant_id=TENANT, decision_id=decisions[3].decision_id, label=pb.OUTCOME_LABEL_FRAUD
        )
    )
    report = await stubs.policy.ReplayDecisions(pb.ReplayDecisionsRequest(tenant_id=TENANT))
    assert report.decisions_replayed == 4 and report.determinism_score == 1.0
    assert report.decisions_labelled == 1 and report.logged_backtest.true_positives == 1
    await expect_error(
        stubs.policy.ReplayDecisions(
            pb.ReplayDecisionsRequest(tenant_id=TENANT, bundle_version="ghost@1")
        ),
        grpc.StatusCode.NOT_FOUND,
        "BUNDLE_VERSION_NOT_FOUND",
    )
    # What was replayed is what was signed: each allow carries a token the
    # money plane accepts for exactly that payment; the review carries none.
    assert [d.outcome for d in decisions] == [pb.OUTCOME_ALLOW] * 3 + [pb.OUTCOME_REVIEW]
    verifier = money_plane_verifier(plane)
    for index, decision in enumerate(decisions[:3]):
        claims = verifier.verify(
            decision.decision_token,
            field="decision_token",
            movement=hold_of(f"rp-{index}"),
            now_us=clock.now_us(),
        )
        assert (claims.decision_id, claims.policy_version) == (
            decision.decision_id,
            decision.bundle_version,
        )
    assert decisions[3].decision_token == ""
