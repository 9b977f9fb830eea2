"""The gRPC servicers: thin translations between protobuf and the engine.
Domain errors raised below become rich statuses in the server's interceptor."""

from __future__ import annotations

import asyncio
from typing import TypeAlias

import grpc

from policy_plane import codec, decision_search, validate
from policy_plane.bundle import BundleSource
from policy_plane.consent import ContactProfile, ContactRecord
from policy_plane.engine import PolicyEngine
from policy_plane.offers import CustomerContext
from triplane.policy.v1 import policy_pb2 as pb
from triplane.policy.v1 import policy_pb2_grpc as pb_grpc
from triplane.runtime import codec as wire
from triplane.runtime.approvals import check_approval
from triplane.runtime.authz import peer_identity
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.server import Service

Ctx: TypeAlias = grpc.aio.ServicerContext
# DiffBundles: lines of context around each change, by default and at most.
DEFAULT_DIFF_CONTEXT_LINES = 3
MAX_DIFF_CONTEXT_LINES = 100


def page_size(requested: int, engine: PolicyEngine) -> int:
    limits = engine.config.limits
    return wire.page_size(requested, limits.default_page_size, limits.max_page_size)


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: Ctx
    ) -> pb.CreateTenantResponse:
        name, created_at_us = await self._engine.create_tenant(
            request.tenant_id, request.display_name
        )
        return pb.CreateTenantResponse(
            tenant_id=request.tenant_id, display_name=name, created_at=wire.timestamp(created_at_us)
        )

    async def Evaluate(self, request: pb.EvaluateRequest, context: Ctx) -> pb.EvaluateResponse:
        # Rule 7: the caller's remaining deadline, capped by this plane's budget.
        deadline = Deadline.from_remaining(
            context.time_remaining(), self._engine.config.budget_ms / 1000.0
        )
        decision, replayed = await self._engine.evaluate(codec.evaluation_input(request), deadline)
        return pb.EvaluateResponse(decision=codec.decision_pb(decision), replayed=replayed)

    async def DecideAdjustment(
        self, request: pb.DecideAdjustmentRequest, context: Ctx
    ) -> pb.DecideAdjustmentResponse:
        deadline = Deadline.from_remaining(
            context.time_remaining(), self._engine.config.budget_ms / 1000.0
        )
        decision, replayed = await self._engine.decide_adjustment(
            codec.adjustment_request(request), deadline
        )
        return pb.DecideAdjustmentResponse(decision=codec.decision_pb(decision), replayed=replayed)

    async def GetDecision(
        self, request: pb.GetDecisionRequest, context: Ctx
    ) -> pb.GetDecisionResponse:
        decision = await self._engine.get_decision(
            request.tenant_id, request.decision_id, request.idempotency_key
        )
        # Names in clear only when asked (the gateway asks for a caller with
        # pii:read; this method serves the gateway and admin identities only).
        sealer, logged = self._engine.sealer, decision.record.input
        tokenized = sealer.tokenized(logged)
        return pb.GetDecisionResponse(
            decision=codec.decision_pb(decision),
            input=codec.evaluate_request_pb(logged if request.reveal_pii else tokenized),
            customer_name_token=tokenized.payment.customer.name,
            counterparty_name_token=tokenized.payment.counterparty.name,
            adjustment=codec.adjustment_pb(logged),
        )

    async def ListDecisions(
        self, request: pb.ListDecisionsRequest, context: Ctx
    ) -> pb.ListDecisionsResponse:
        return await decision_search.list_decisions(self._engine, request)

    async def ReplayDecisions(
        self, request: pb.ReplayDecisionsRequest, context: Ctx
    ) -> pb.ReplayDecisionsResponse:
        report = await self._engine.replay(codec.replay_window(request), request.bundle_version)
        return codec.replay_pb(report)

    async def VerifyDecisionLog(
        self, request: pb.VerifyDecisionLogRequest, context: Ctx
    ) -> pb.VerifyDecisionLogResponse:
        return codec.verify_pb(await self._engine.verify_log(request.chain_id))

    async def LabelDecision(
        self, request: pb.LabelDecisionRequest, context: Ctx
    ) -> pb.LabelDecisionResponse:
        label = codec.LABELS.get(request.label, "")
        await self._engine.label_decision(request.tenant_id, request.decision_id, label)
        return pb.LabelDecisionResponse(decision_id=request.decision_id, label=request.label)

    async def GetPolicyMetrics(
        self, request: pb.GetPolicyMetricsRequest, context: Ctx
    ) -> pb.GetPolicyMetricsResponse:
        return codec.metrics_pb(await self._engine.metrics(request.tenant_id))


class BundleServicer(pb_grpc.BundleServiceServicer):
    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def LoadBundle(
        self, request: pb.LoadBundleRequest, context: Ctx
    ) -> pb.LoadBundleResponse:
        if not request.content.strip():
            raise InvalidArgument("FIELD_REQUIRED", "content is required", "content")
        target = codec.TARGETS.get(request.target)
        if target is None:
            raise InvalidArgument(
                "BUNDLE_TARGET_UNKNOWN", "target is STORE, LIVE or SHADOW", "target"
            )
        source = BundleSource(
            yaml_text=request.content,
            label_override=request.label,
            sanctions_csv=request.sanctions_list_csv,
            aliases_csv=request.sanctions_aliases_csv,
        )
        info = await asyncio.to_thread(self._engine.bundles.load, source, target)
        return pb.LoadBundleResponse(bundle=codec.bundle_info_pb(info))

    async def ActivateBundle(
        self, request: pb.ActivateBundleRequest, context: Ctx
    ) -> pb.ActivateBundleResponse:
        check_approval(request.actor, request.reason)
        info = await asyncio.to_thread(
            self._engine.bundles.activate, request.version, request.actor, request.reason
        )
        return pb.ActivateBundleResponse(bundle=codec.bundle_info_pb(info))

    async def SetShadowBundle(
        self, request: pb.SetShadowBundleRequest, context: Ctx
    ) -> pb.SetShadowBundleResponse:
        check_approval(request.actor, request.reason)
        info = await asyncio.to_thread(
            self._engine.bundles.set_shadow, request.version, request.actor, request.reason
        )
        return pb.SetShadowBundleResponse(shadow=codec.maybe_bundle_info_pb(info))

    async def GetActiveBundle(
        self, request: pb.GetActiveBundleRequest, context: Ctx
    ) -> pb.GetActiveBundleResponse:
        registry = self._engine.bundles
        live = (
            await asyncio.to_thread(registry.info, registry.live.version) if registry.live else None
        )
        shadow = (
            await asyncio.to_thread(registry.info, registry.shadow.version)
            if registry.shadow
            else None
        )
        return pb.GetActiveBundleResponse(
            live=codec.maybe_bundle_info_pb(live), shadow=codec.maybe_bundle_info_pb(shadow)
        )

    async def ListBundles(
        self, request: pb.ListBundlesRequest, context: Ctx
    ) -> pb.ListBundlesResponse:
        size = page_size(request.page_size, self._engine)
        offset = wire.decode_page_offset(request.page_token, codec.BUNDLES_PAGE)
        infos = await asyncio.to_thread(self._engine.bundles.list_bundles, offset, size + 1)
        next_token = (
            wire.encode_page_token(codec.BUNDLES_PAGE, (offset + size,))
            if len(infos) > size
            else ""
        )
        return pb.ListBundlesResponse(
            bundles=[codec.bundle_info_pb(i) for i in infos[:size]], next_page_token=next_token
        )

    async def DiffBundles(
        self, request: pb.DiffBundlesRequest, context: Ctx
    ) -> pb.DiffBundlesResponse:
        for name in ("from_version", "to_version"):
            if not getattr(request, name):
                raise InvalidArgument("FIELD_REQUIRED", f"{name} is required", name)
        if not 0 <= request.context_lines <= MAX_DIFF_CONTEXT_LINES:
            raise InvalidArgument(
                "CONTEXT_LINES_INVALID",
                f"context_lines is 0 to {MAX_DIFF_CONTEXT_LINES}",
                "context_lines",
            )
        older, newer, text, lists_changed = await asyncio.to_thread(
            self._engine.bundles.diff,
            request.from_version,
            request.to_version,
            request.context_lines or DEFAULT_DIFF_CONTEXT_LINES,
        )
        return pb.DiffBundlesResponse(
            from_bundle=codec.bundle_info_pb(older),
            to_bundle=codec.bundle_info_pb(newer),
            unified_diff=text,
            sanctions_lists_changed=lists_changed,
        )


class ConsentServicer(pb_grpc.ConsentServiceServicer):
    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def PutContactProfile(
        self, request: pb.PutContactProfileRequest, context: Ctx
    ) -> pb.PutContactProfileResponse:
        profile = request.profile
        self._engine.check_customer(profile.tenant_id, profile.customer_id, "profile")
        stored = await asyncio.to_thread(
            self._engine.consent.put_profile,
            ContactProfile(
                tenant_id=profile.tenant_id,
                customer_id=profile.customer_id,
                time_zone=profile.time_zone,
                vulnerable=profile.vulnerable,
            ),
        )
        return pb.PutContactProfileResponse(profile=codec.profile_pb(stored))

    async def SetConsent(
        self, request: pb.SetConsentRequest, context: Ctx
    ) -> pb.SetConsentResponse:
        self._engine.check_customer(request.tenant_id, request.customer_id)
        stored = await asyncio.to_thread(
            self._engine.consent.set_consent,
            request.tenant_id,
            request.customer_id,
            codec.consent_record(request.consent),
        )
        return pb.SetConsentResponse(consent=codec.consent_pb(stored))

    async def GetConsent(
        self, request: pb.GetConsentRequest, context: Ctx
    ) -> pb.GetConsentResponse:
        self._engine.check_customer(request.tenant_id, request.customer_id)
        profile, consents = await self._engine.read(
            self._engine.consent.get, request.tenant_id, request.customer_id
        )
        return pb.GetConsentResponse(
            profile=codec.profile_pb(profile), consents=[codec.consent_pb(c) for c in consents]
        )

    async def CheckContact(
        self, request: pb.CheckContactRequest, context: Ctx
    ) -> pb.CheckContactResponse:
        self._engine.check_customer(request.tenant_id, request.customer_id)
        channel = codec.channel(request.channel)
        topic = codec.topic(request.topic)
        cooldown_s, max_week = 0, 0
        if request.offer_id:
            offer = await self._engine.read(
                self._engine.offers.get, request.tenant_id, request.offer_id
            )
            cooldown_s, max_week = offer.cooldown_s, offer.max_contacts_per_week
        contact_at_us = 0
        if request.HasField("contact_at"):
            contact_at_us = wire.micros(request.contact_at, "contact_at")
            if contact_at_us <= 0:
                raise InvalidArgument("TIME_INVALID", "contact_at before 1970", "contact_at")
        check = await self._engine.read(
            self._engine.consent.check,
            request.tenant_id,
            request.customer_id,
            channel,
            topic,
            request.offer_id,
            cooldown_s,
            max_week,
            at_us=contact_at_us,
        )
        return codec.check_contact_pb(check)

    async def RecordContact(
        self, request: pb.RecordContactRequest, context: Ctx
    ) -> pb.RecordContactResponse:
        engine = self._engine
        engine.check_customer(request.tenant_id, request.customer_id)
        validate.check_id(request.contact_id, "contact_id", engine.config.limits)
        if request.offer_id:
            validate.check_id(request.offer_id, "offer_id", engine.config.limits)
        contact = ContactRecord(
            contact_id=request.contact_id,
            channel=codec.channel(request.channel),
            topic=codec.topic(request.topic),
            offer_id=request.offer_id,
            at_us=wire.micros(request.contacted_at, "contacted_at") or engine.clock.now_us(),
        )
        replayed = await asyncio.to_thread(
            engine.consent.record_contact, request.tenant_id, request.customer_id, contact
        )
        return pb.RecordContactResponse(contact_id=request.contact_id, replayed=replayed)


class OfferServicer(pb_grpc.OfferServiceServicer):
    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def PutOffer(self, request: pb.PutOfferRequest, context: Ctx) -> pb.PutOfferResponse:
        self._engine.require_tenant(request.offer.tenant_id, "offer")
        stored = await asyncio.to_thread(self._engine.offers.put, codec.offer_entry(request.offer))
        return pb.PutOfferResponse(offer=codec.offer_pb(stored))

    async def StopOffer(self, request: pb.StopOfferRequest, context: Ctx) -> pb.StopOfferResponse:
        self._engine.require_tenant(request.tenant_id)
        stored = await asyncio.to_thread(
            self._engine.offers.stop, request.tenant_id, request.offer_id
        )
        return pb.StopOfferResponse(offer=codec.offer_pb(stored))

    async def GetOffer(self, request: pb.GetOfferRequest, context: Ctx) -> pb.GetOfferResponse:
        self._engine.require_tenant(request.tenant_id)
        offer = await self._engine.read(
            self._engine.offers.get, request.tenant_id, request.offer_id
        )
        return pb.GetOfferResponse(offer=codec.offer_pb(offer))

    async def ListOffers(
        self, request: pb.ListOffersRequest, context: Ctx
    ) -> pb.ListOffersResponse:
        self._engine.require_tenant(request.tenant_id)
        size = page_size(request.page_size, self._engine)
        position = wire.decode_page_token(request.page_token, codec.OFFERS_PAGE, (str,))
        after = str(position[0]) if position is not None else ""
        offers = await self._engine.read(
            self._engine.offers.list_offers, request.tenant_id, after, size + 1
        )
        next_token = (
            wire.encode_page_token(codec.OFFERS_PAGE, (offers[size - 1].offer_id,))
            if len(offers) > size
            else ""
        )
        return pb.ListOffersResponse(
            offers=[codec.offer_pb(o) for o in offers[:size]], next_page_token=next_token
        )

    async def GetEligibleOffers(
        self, request: pb.GetEligibleOffersRequest, context: Ctx
    ) -> pb.GetEligibleOffersResponse:
        engine = self._engine
        engine.check_customer(request.tenant_id, request.customer_id)
        if len(request.features) > engine.config.limits.max_features:
            raise InvalidArgument("TOO_MANY_FEATURES", "too many features", "features")
        # The KYC tier an offer's eligibility sees is the profile's, never the
        # caller's: a customer without a profile is tier 0.
        profile = await engine.profiles.for_decision(request.tenant_id, request.customer_id)
        eligible, excluded = await engine.read(
            engine.offers.eligible,
            CustomerContext(
                tenant_id=request.tenant_id,
                customer_id=request.customer_id,
                partner_id=request.partner_id,
                region=request.region,
                kyc_tier=profile.kyc_tier if profile is not None else 0,
                features=dict(request.features),
            ),
        )
        return pb.GetEligibleOffersResponse(
            eligible=[codec.eligible_pb(e) for e in eligible],
            excluded=[codec.excluded_pb(x) for x in excluded],
        )


class CaseServicer(pb_grpc.CaseServiceServicer):
    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def ListCases(self, request: pb.ListCasesRequest, context: Ctx) -> pb.ListCasesResponse:
        self._engine.require_tenant(request.tenant_id)
        size = page_size(request.page_size, self._engine)
        status = codec.CASE_STATUSES.get(request.status, "")
        position = wire.decode_page_token(request.page_token, codec.CASES_PAGE, (str,))
        after = str(position[0]) if position is not None else ""
        cases = await asyncio.to_thread(
            self._engine.cases.list_cases, request.tenant_id, status, after, size + 1
        )
        next_token = (
            wire.encode_page_token(codec.CASES_PAGE, (cases[size - 1].case_id,))
            if len(cases) > size
            else ""
        )
        return pb.ListCasesResponse(
            cases=[codec.case_pb(c) for c in cases[:size]], next_page_token=next_token
        )

    async def GetCase(self, request: pb.GetCaseRequest, context: Ctx) -> pb.GetCaseResponse:
        self._engine.require_tenant(request.tenant_id)
        case = await asyncio.to_thread(self._engine.cases.get, request.tenant_id, request.case_id)
        return pb.GetCaseResponse(case=codec.case_pb(case))

    async def ClaimCase(self, request: pb.ClaimCaseRequest, context: Ctx) -> pb.ClaimCaseResponse:
        case = await self._engine.claim_case(request.tenant_id, request.case_id, request.reviewer)
        return pb.ClaimCaseResponse(case=codec.case_pb(case))

    async def ResolveCase(
        self, request: pb.ResolveCaseRequest, context: Ctx
    ) -> pb.ResolveCaseResponse:
        case = await self._engine.resolve_case(
            request.tenant_id,
            request.case_id,
            request.reviewer,
            codec.RESOLUTIONS.get(request.resolution, ""),
            request.note,
        )
        return pb.ResolveCaseResponse(case=codec.case_pb(case))

    async def GetOverruleSeries(
        self, request: pb.GetOverruleSeriesRequest, context: Ctx
    ) -> pb.GetOverruleSeriesResponse:
        series = await self._engine.overrule_series(
            request.tenant_id,
            wire.micros(request.start_time, "start_time"),
            wire.micros(request.end_time, "end_time"),
            request.bucket_seconds,
        )
        return codec.overrule_series_pb(series)


class CustomerProfileServicer(pb_grpc.CustomerProfileServiceServicer):
    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def PutCustomerProfile(
        self, request: pb.PutCustomerProfileRequest, context: Ctx
    ) -> pb.PutCustomerProfileResponse:
        # Who made the change: the caller's verified identity, and the actor
        # it names (an operator, a KYC provider) beside it.
        identity = peer_identity(context) or "no client certificate"
        validate.check_text(request.actor, "actor", self._engine.config.limits.max_string_length)
        actor = f"{request.actor} via {identity}" if request.actor else ""
        profile, replayed, applied = await self._engine.put_customer_profile(
            codec.customer_profile(request.profile), request.change_id, actor
        )
        return pb.PutCustomerProfileResponse(
            profile=codec.customer_profile_pb(profile), replayed=replayed, applied=applied
        )

    async def GetCustomerProfile(
        self, request: pb.GetCustomerProfileRequest, context: Ctx
    ) -> pb.GetCustomerProfileResponse:
        profile, changes = await self._engine.get_customer_profile(
            request.tenant_id, request.customer_id
        )
        return pb.GetCustomerProfileResponse(
            profile=codec.customer_profile_pb(profile),
            changes=[codec.profile_change_pb(c) for c in changes],
        )


def services(engine: PolicyEngine) -> list[Service]:
    """The plane's gRPC services, ready for PlaneServer."""
    policy, bundles = PolicyServicer(engine), BundleServicer(engine)
    consent, offers, cases = ConsentServicer(engine), OfferServicer(engine), CaseServicer(engine)
    profiles = CustomerProfileServicer(engine)
    descriptor = pb.DESCRIPTOR.services_by_name
    return [
        Service(
            descriptor["PolicyService"].full_name,
            lambda s: pb_grpc.add_PolicyServiceServicer_to_server(policy, s),
        ),
        Service(
            descriptor["BundleService"].full_name,
            lambda s: pb_grpc.add_BundleServiceServicer_to_server(bundles, s),
        ),
        Service(
            descriptor["ConsentService"].full_name,
            lambda s: pb_grpc.add_ConsentServiceServicer_to_server(consent, s),
        ),
        Service(
            descriptor["OfferService"].full_name,
            lambda s: pb_grpc.add_OfferServiceServicer_to_server(offers, s),
        ),
        Service(
            descriptor["CaseService"].full_name,
            lambda s: pb_grpc.add_CaseServiceServicer_to_server(cases, s),
        ),
        Service(
            descriptor["CustomerProfileService"].full_name,
            lambda s: pb_grpc.add_CustomerProfileServiceServicer_to_server(profiles, s),
        ),
    ]
