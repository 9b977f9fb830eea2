"""Decide the next best action, and close the loop with its outcome.

DecideNextAction: policy filters the catalog first (eligibility, consent, quiet
hours, caps: hard constraints) -> ai Rank on what is left, with the request's
context and each offer's lever (on its budget; a failure falls back to value x
levers with uniform exploration, said in the answer) -> the learner's choice
is shown with the probability it was drawn with (gateway.arbitration.policy
learner; arbitration for experiment arms configured so) -> global holdout
(ranked but not shown, and never rewarded) -> exposure logged
(NATS `gateway.exposure.logged`, measurement) -> the answer. RecordOutcome
updates the bandit (ai ReportOutcome, and the `gateway.offer.outcome` event the
AI plane's pipeline also consumes; both are deduplicated on one outcome id)
and feeds measurement.
"""

from __future__ import annotations

import asyncio
import logging

from gateway import arbitration, codec, validate
from gateway.core import CallContext, Core, stable_id
from gateway.ports import ExperimentsPort, MeasurementPort
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.policy.v1 import policy_pb2
from triplane.runtime import bus
from triplane.runtime import codec as wire
from triplane.runtime.config import SurfaceConfig
from triplane.runtime.errors import InvalidArgument, NotFound, TriplaneError

log = logging.getLogger("gateway.nba")

DECIDE, OUTCOME = "DecideNextAction", "RecordOutcome"
EXPOSURE_SCOPE = "nba.exposure"
EXPOSURE_EVENT, OUTCOME_EVENT = "gateway.exposure.logged", "gateway.outcome.recorded"
BANDIT_EVENT = "gateway.offer.outcome"
HOLDOUT, NOTHING_ELIGIBLE = "HOLDOUT", "NOTHING_ELIGIBLE"
MAX_BACKGROUND_TASKS = 10_000
# What the learner counts: a conversion's value, an explicit negative, nothing.
OUTCOME_KINDS: dict[int, ai_pb2.OutcomeKind.ValueType] = {
    gw.OUTCOME_KIND_CONVERTED: ai_pb2.OUTCOME_KIND_CONVERTED,
    gw.OUTCOME_KIND_DISMISSED: ai_pb2.OUTCOME_KIND_DISMISSED,
    gw.OUTCOME_KIND_IGNORED: ai_pb2.OUTCOME_KIND_IGNORED,
}


class NextBestAction:
    def __init__(
        self, core: Core, experiments: ExperimentsPort, measurement: MeasurementPort
    ) -> None:
        self.core = core
        self.limits = core.config.limits
        self.experiments = experiments
        self.measurement = measurement
        self.surfaces: dict[str, SurfaceConfig] = {
            s.name: s for s in core.config.arbitration.surfaces
        }
        self._background: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- decide

    def _validate(self, req: gw.DecideNextActionRequest) -> SurfaceConfig:
        limits = self.limits
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.idempotency_key, "idempotency_key", limits)
        validate.require_id(req.customer_id, "customer_id", limits)
        validate.require_id(req.account_id, "account_id", limits)
        validate.check_id(req.partner_id, "partner_id", limits)
        validate.check_country(req.region, "region")
        validate.check_features(req.features, "features", limits)
        if not 0 <= req.kyc_tier <= 3:
            raise InvalidArgument("KYC_TIER_INVALID", "kyc_tier is 0..3", "kyc_tier")
        if req.HasField("local_hour") and not 0 <= req.local_hour <= 23:
            raise InvalidArgument("LOCAL_HOUR_INVALID", "local_hour is 0..23", "local_hour")
        surface = self.surfaces.get(req.surface)
        if surface is None:
            raise InvalidArgument(
                "SURFACE_UNKNOWN",
                f"surface must be one of {', '.join(sorted(self.surfaces))}",
                "surface",
            )
        return surface

    async def decide(
        self, req: gw.DecideNextActionRequest, call: CallContext
    ) -> gw.DecideNextActionResponse:
        surface = self._validate(req)
        answer = await self.core.idempotent(
            req.tenant_id,
            DECIDE,
            req.idempotency_key,
            req,
            gw.DecideNextActionResponse,
            lambda: self._decide(req, surface, call),
        )
        # Its outcome may go to another gateway replica, which reads the
        # exposure from the shared store: committed before the answer leaves.
        await self.core.store.commit(f"{req.tenant_id}\x1f{EXPOSURE_SCOPE}", answer.decision_id)
        return answer

    async def _decide(
        self, req: gw.DecideNextActionRequest, surface: SurfaceConfig, call: CallContext
    ) -> gw.DecideNextActionResponse:
        core, tenant = self.core, req.tenant_id
        now_us = core.clock.now_us()
        customer_token = core.tokenizer.token(tenant, "customer", req.customer_id)
        decision_id = stable_id("nba_", tenant, req.idempotency_key)
        assigned = self.experiments.assign(
            tenant, experiment=core.config.decide_experiment, customer_token=customer_token
        )
        assignment = gw.ExperimentAssignment(
            experiment=core.config.decide_experiment, arm=assigned.arm, holdout=assigned.holdout
        )
        eligible = await core.policy.eligible_offers(
            policy_pb2.GetEligibleOffersRequest(
                tenant_id=tenant,
                customer_id=req.customer_id,
                partner_id=req.partner_id,
                region=req.region,
                features=dict(req.features),
            ),
            core.timeout_s(call, core.config.budgets.policy_budget_ms),
        )
        answer = gw.DecideNextActionResponse(
            decision_id=decision_id,
            action=gw.ACTION_NONE,
            assignment=assignment,
            surface=req.surface,
            idempotency_key=req.idempotency_key,
            excluded=[codec.excluded_offer(e) for e in eligible.excluded],
        )
        wire.fill_timestamp(answer.send_at, now_us)
        shown: gw.OfferChoice | None = None
        if not eligible.eligible:
            answer.reasons.append(NOTHING_ELIGIBLE)
        else:
            shown = await self._arbitrate(req, surface, eligible, answer, now_us, call)
        conversions = [
            list(offer.conversion_events)
            for offer in eligible.eligible
            if shown is not None and offer.offer_id == shown.offer_id
        ]
        self._log_exposure(
            tenant, customer_token, answer, shown, now_us, conversions[0] if conversions else []
        )
        return answer

    async def _arbitrate(
        self,
        req: gw.DecideNextActionRequest,
        surface: SurfaceConfig,
        eligible: policy_pb2.GetEligibleOffersResponse,
        answer: gw.DecideNextActionResponse,
        now_us: int,
        call: CallContext,
    ) -> gw.OfferChoice:
        """Fills the answer; returns the offer shown (or, for the holdout, the
        one that would have been)."""
        core = self.core
        offers = {o.offer_id: o for o in eligible.eligible}
        arbitration_config = core.config.arbitration
        policy = arbitration_config.arm_policies.get(
            answer.assignment.arm, arbitration_config.policy
        )
        # The learner's choice is shown unless the customer is held out or
        # the arm runs arbitration: then it must not wait for a reward.
        held_out = answer.assignment.holdout or policy != "learner"
        ranked, failure = await self._rank(req, eligible, now_us, call, held_out)
        if ranked is None:
            answer.rank_fallback_reason = failure
            propensities = {o: (1.0, 1.0 / len(offers)) for o in offers}
        else:
            answer.rank_id = ranked.rank_id
            answer.model_ref.CopyFrom(ranked.model_ref)
            propensities = {
                r.offer_id: (r.propensity, r.exploration_probability) for r in ranked.offers
            }
        candidates = [
            arbitration.Candidate(
                offer_id=offer_id,
                value_minor=offers[offer_id].value.amount_minor,
                propensity=propensities.get(offer_id, (0.0, 0.0))[0],
                bandit_probability=propensities.get(offer_id, (0.0, 0.0))[1],
            )
            for offer_id in sorted(offers)
        ]
        if ranked is not None and policy == "learner" and ranked.chosen_offer_id in offers:
            choice = arbitration.follow_learner(
                arbitration_config,
                candidates,
                req.surface,
                surface.context_weight,
                ranked.chosen_offer_id,
                ranked.chosen_probability,
            )
        else:
            choice = arbitration.choose(
                arbitration_config,
                candidates,
                req.surface,
                surface.context_weight,
                answer.decision_id,
            )
        chosen = self._offer_choice(choice.chosen, offers, surface)
        answer.action_probability = choice.probability
        answer.alternatives.extend(
            self._offer_choice(s, offers, surface) for s in choice.ranked if s is not choice.chosen
        )
        del answer.alternatives[core.config.limits.max_alternatives :]
        if answer.assignment.holdout:
            # The offer that would have been shown is logged (for per-offer
            # lift) but not answered: the holdout sees nothing.
            answer.reasons.append(HOLDOUT)
            return chosen
        answer.action = gw.ACTION_SHOW_OFFER
        answer.offer.CopyFrom(chosen)
        answer.channel = chosen.channel
        answer.reasons.append(choice.reason)
        self._record_contact(req, answer)
        return chosen

    async def _rank(
        self,
        req: gw.DecideNextActionRequest,
        eligible: policy_pb2.GetEligibleOffersResponse,
        now_us: int,
        call: CallContext,
        held_out: bool = False,
    ) -> tuple[ai_pb2.RankResponse | None, str]:
        core = self.core
        hour = req.local_hour if req.HasField("local_hour") else (now_us // 3_600_000_000) % 24
        candidates = [codec.offer_candidate(o) for o in eligible.eligible]
        for candidate in candidates:
            # The business levers go inside the learner's objective.
            candidate.lever = arbitration.lever(
                core.config.arbitration, candidate.offer_id, req.surface
            )
        request = ai_pb2.RankRequest(
            tenant_id=req.tenant_id,
            account_id=req.account_id,
            candidates=candidates,
            channel=ai_pb2.CHANNEL_IN_APP,
            hour_of_day=int(hour),
            occurred_at=wire.timestamp(now_us),
            # The moment's context reaches the learner.
            features=dict(req.features),
            surface=req.surface,
            region=req.region,
            held_out=held_out,
        )
        try:
            ranked = await core.ai.rank(
                request, core.timeout_s(call, core.config.budgets.ai_rank_budget_ms)
            )
        except TriplaneError as error:
            log.info("ranking fell back: %s", error.reason)
            return None, error.reason or "AI_FAILED"
        return ranked, ""

    def _offer_choice(
        self,
        scored: arbitration.Scored,
        offers: dict[str, policy_pb2.EligibleOffer],
        surface: SurfaceConfig,
    ) -> gw.OfferChoice:
        offer = offers[scored.candidate.offer_id]
        channel = int(offer.channel) or codec.CONTACT_CHANNELS.get(surface.default_channel, 0)
        return gw.OfferChoice(
            offer_id=offer.offer_id,
            product=codec.product_name(offer.product),
            value=offer.value,
            variant_id=offer.variant.variant_id,
            creative_id=offer.variant.creative_id,
            propensity=scored.candidate.propensity,
            arbitration_score=scored.score,
            exploration_probability=scored.candidate.bandit_probability,
            channel=channel,  # type: ignore[arg-type]
        )

    def _record_contact(
        self, req: gw.DecideNextActionRequest, answer: gw.DecideNextActionResponse
    ) -> None:
        """Counts the contact for caps and cooldowns, off the hot path."""
        core = self.core
        request = policy_pb2.RecordContactRequest(
            tenant_id=req.tenant_id,
            customer_id=req.customer_id,
            contact_id=answer.decision_id,
            channel=int(answer.channel),  # type: ignore[arg-type]
            topic=policy_pb2.TOPIC_MARKETING,
            offer_id=answer.offer.offer_id,
        )

        async def record() -> None:
            try:
                await core.policy.record_contact(
                    request, core.config.budgets.policy_budget_ms / 1000
                )
            except TriplaneError as error:
                log.warning("contact not recorded: %s", error.reason)

        self._spawn(record())

    def _spawn(self, coroutine: object) -> None:
        if len(self._background) >= MAX_BACKGROUND_TASKS:
            log.warning("too many background tasks; skipped one")
            coroutine.close()  # type: ignore[attr-defined]
            return
        task = asyncio.ensure_future(coroutine)  # type: ignore[call-overload]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _log_exposure(
        self,
        tenant_id: str,
        customer_token: str,
        answer: gw.DecideNextActionResponse,
        shown: gw.OfferChoice | None,
        now_us: int,
        conversion_events: list[str],
    ) -> None:
        exposure = gw.ExposureLogged(
            decision_id=answer.decision_id,
            customer_token=customer_token,
            surface=answer.surface,
            action=answer.action,
            offer_id=shown.offer_id if shown is not None else "",
            channel=answer.channel,
            send_at=answer.send_at,
            reasons=list(answer.reasons),
            action_probability=answer.action_probability,
            propensity=shown.propensity if shown is not None else 0.0,
            assignment=answer.assignment,
            rank_id=answer.rank_id,
            alternative_offer_ids=[a.offer_id for a in answer.alternatives],
            conversion_events=conversion_events,
        )
        core = self.core
        core.store.put(
            f"{tenant_id}\x1f{EXPOSURE_SCOPE}",
            answer.decision_id,
            {},
            exposure.SerializeToString(deterministic=True),
        )
        envelope = bus.make_envelope(
            event_type=EXPOSURE_EVENT,
            tenant_id=tenant_id,
            payload=exposure,
            occurred_at_us=now_us,
            event_id=stable_id("exp_", tenant_id, answer.decision_id),
            idempotency_key=answer.idempotency_key,
        )
        core.events.enqueue(
            [
                bus.OutgoingEvent(
                    envelope.event_id,
                    bus.subject_for(EXPOSURE_EVENT, tenant_id),
                    envelope.SerializeToString(),
                )
            ]
        )
        self._spawn(self._measure_exposure(tenant_id, now_us, exposure))

    async def _measure_exposure(
        self, tenant_id: str, now_us: int, exposure: gw.ExposureLogged
    ) -> None:
        try:
            await self.measurement.exposure(tenant_id, now_us, exposure)
        except Exception:
            log.exception("measurement did not take the exposure %s", exposure.decision_id)

    # ---------------------------------------------------------------- outcome

    async def record_outcome(
        self, req: gw.RecordOutcomeRequest, call: CallContext
    ) -> gw.RecordOutcomeResponse:
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.idempotency_key, "idempotency_key", self.limits)
        validate.require_id(req.decision_id, "decision_id", self.limits)
        if req.kind == gw.OUTCOME_KIND_UNSPECIFIED:
            raise InvalidArgument("OUTCOME_KIND_REQUIRED", "kind is required", "kind")
        validate.check_money(req.value, "value", self.limits, required=False)
        return await self.core.idempotent(
            req.tenant_id,
            OUTCOME,
            req.idempotency_key,
            req,
            gw.RecordOutcomeResponse,
            lambda: self._record_outcome(req, call),
        )

    async def _record_outcome(
        self, req: gw.RecordOutcomeRequest, call: CallContext
    ) -> gw.RecordOutcomeResponse:
        core, tenant = self.core, req.tenant_id
        found = await core.store.get(f"{tenant}\x1f{EXPOSURE_SCOPE}", req.decision_id)
        if found is None:
            raise NotFound(
                "DECISION_NOT_FOUND",
                f"no next-best-action decision {req.decision_id!r}",
                "decision_id",
            )
        exposure = gw.ExposureLogged.FromString(found.body)
        reward = 1.0 if req.kind == gw.OUTCOME_KIND_CONVERTED else 0.0
        kind = OUTCOME_KINDS.get(req.kind, ai_pb2.OUTCOME_KIND_UNSPECIFIED)
        value = req.value if req.HasField("value") else None
        now_us = core.clock.now_us()
        outcome_id = stable_id("out_", tenant, req.idempotency_key)
        answer = gw.RecordOutcomeResponse(
            decision_id=req.decision_id,
            offer_id=exposure.offer_id,
            reward=reward,
            idempotency_key=req.idempotency_key,
        )
        events: list[bus.OutgoingEvent] = []
        if exposure.action == gw.ACTION_SHOW_OFFER and exposure.rank_id:
            bandit = ai_pb2.OfferOutcomeEvent(
                rank_id=exposure.rank_id,
                offer_id=exposure.offer_id,
                reward=reward,
                kind=kind,
                value=value,
            )
            events.append(self._event(BANDIT_EVENT, tenant, bandit, now_us, outcome_id, req))
            try:
                applied = await core.ai.report_outcome(
                    ai_pb2.ReportOutcomeRequest(
                        tenant_id=tenant,
                        rank_id=exposure.rank_id,
                        offer_id=exposure.offer_id,
                        reward=reward,
                        outcome_id=outcome_id,
                        kind=kind,
                        value=value,
                    ),
                    core.timeout_s(call, core.config.budgets.ai_outcome_budget_ms),
                )
                answer.bandit_updated = applied.applied
            except TriplaneError as error:
                # The event above reaches the bandit through the AI plane's
                # pipeline once it is back; the outcome is not lost.
                log.info("bandit update deferred to the event spine: %s", error.reason)
        recorded = gw.OutcomeRecorded(
            decision_id=req.decision_id,
            customer_token=exposure.customer_token,
            offer_id=exposure.offer_id,
            kind=req.kind,
            reward=reward,
            assignment=exposure.assignment,
            surface=exposure.surface,
        )
        events.append(
            self._event(OUTCOME_EVENT, tenant, recorded, now_us, stable_id("oc_", outcome_id), req)
        )
        core.events.enqueue(events)
        await self.measurement.outcome(tenant, now_us, recorded)
        return answer

    def _event(
        self,
        event_type: str,
        tenant_id: str,
        payload: gw.OutcomeRecorded | ai_pb2.OfferOutcomeEvent,
        now_us: int,
        event_id: str,
        req: gw.RecordOutcomeRequest,
    ) -> bus.OutgoingEvent:
        envelope = bus.make_envelope(
            event_type=event_type,
            tenant_id=tenant_id,
            payload=payload,
            occurred_at_us=now_us,
            event_id=event_id,
            idempotency_key=req.idempotency_key,
            amount=req.value if req.HasField("value") else None,
        )
        return bus.OutgoingEvent(
            envelope.event_id, bus.subject_for(event_type, tenant_id), envelope.SerializeToString()
        )


_ = types_pb2
