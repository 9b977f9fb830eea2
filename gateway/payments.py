"""Authorize a payment, then capture, void or refund it; and "why?".

AuthorizePayment: validate -> tokenize -> ai Score (on its budget; any failure
degrades to an explicit "no score", never an error) -> policy Evaluate with the
context snapshot -> on allow, a money AUTHORIZE hold carrying the signed token;
on hold or review the policy plane has opened a case; on deny the reasons.
Every downstream key is derived from the caller's, and the policy request is
journaled before it is sent, so a retry after any plane restarted replays the
same decision and the same hold.
"""

from __future__ import annotations

import datetime as dt
import logging
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway import codec, fields, validate
from gateway.auth.principal import current_principal
from gateway.auth.scopes import PII_READ
from gateway.core import CallContext, Core
from gateway.fields import public_error
from gateway.pii import NameSet, looks_like_pan
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.money.v1 import money_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime.config import ConfigError
from triplane.runtime.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    TriplaneError,
    error_for,
)

log = logging.getLogger("gateway.payments")

# What the AI plane refuses because of the caller's request, not a failure of
# its own: the authorization is refused with it rather than go on unscored.
_CALLER_ERRORS = frozenset({Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE})

AUTHORIZE = "AuthorizePayment"
NO_SCORE_MODEL = "payment_risk"
SOURCE_NONE = "none"


def money_error(item: types_pb2.ItemError) -> TriplaneError:
    """A failed transfer result as the error of the gateway's request."""
    found = error_for(item.code, item.reason, item.message, item.field)
    return public_error(found, fields.TRANSFER)


def _zone(name: str) -> ZoneInfo | None:
    """The IANA zone `name`, or None when there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a name longer than a file name may be (zoneinfo opens it).
        return None


class Payments:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.limits = core.config.limits
        default_zone = _zone(core.config.default_time_zone)
        if default_zone is None:
            raise ConfigError(
                f"gateway.default_time_zone: unknown IANA time zone "
                f"{core.config.default_time_zone!r}"
            )
        self.default_zone = default_zone

    def local_hour(self, customer: gw.Customer, now_us: int) -> int:
        """The customer's local hour of day now (their zone, else the
        configured default): what the risk model reads as hour_of_day."""
        zone = _zone(customer.time_zone) if customer.time_zone else self.default_zone
        return dt.datetime.fromtimestamp(now_us / 1_000_000, zone or self.default_zone).hour

    # ---------------------------------------------------------------- authorize

    def _validate_authorize(self, req: gw.AuthorizePaymentRequest) -> None:
        limits = self.limits
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.idempotency_key, "idempotency_key", limits)
        validate.require_id(req.account_id, "account_id", limits)
        validate.require_id(req.credit_account_id, "credit_account_id", limits)
        validate.check_money(req.amount, "amount", limits, required=True)
        if req.kind not in codec.KIND_TO_POLICY:
            raise InvalidArgument("PAYMENT_KIND_REQUIRED", "kind is required", "kind")
        if req.card_number and not _pan_ok(req.card_number):
            raise InvalidArgument(
                "CARD_NUMBER_INVALID", "card_number is not a valid PAN (Luhn)", "card_number"
            )
        validate.check_string(req.payment_method, "payment_method", limits)
        validate.check_id(req.device_id, "device_id", limits)
        validate.check_id(req.merchant_id, "merchant_id", limits)
        validate.check_mcc(req.merchant_category, "merchant_category")
        self._validate_customer(req.customer, "customer")
        validate.check_string(req.counterparty.name, "counterparty.name", limits)
        validate.check_country(req.counterparty.country, "counterparty.country")
        validate.check_attributes(req.attributes, "attributes", limits)
        if req.hold_timeout_s < 0:
            raise InvalidArgument(
                "HOLD_TIMEOUT_NEGATIVE", "hold_timeout_s must be >= 0", "hold_timeout_s"
            )

    def _validate_customer(self, customer: gw.Customer, field: str) -> None:
        limits = self.limits
        validate.check_id(customer.customer_id, f"{field}.customer_id", limits)
        for name in ("name", "email", "phone", "time_zone"):
            validate.check_string(getattr(customer, name), f"{field}.{name}", limits)
        if customer.time_zone and _zone(customer.time_zone) is None:
            raise InvalidArgument(
                "TIME_ZONE_UNKNOWN",
                f"{customer.time_zone!r} is not an IANA time zone (e.g. Europe/Paris)",
                f"{field}.time_zone",
            )
        validate.check_country(customer.country, f"{field}.country")
        if not 0 <= customer.kyc_tier <= 3:
            raise InvalidArgument("KYC_TIER_INVALID", "kyc_tier is 0..3", f"{field}.kyc_tier")
        if customer.account_age_days < 0:
            raise InvalidArgument(
                "ACCOUNT_AGE_NEGATIVE", "account_age_days must be >= 0", f"{field}.account_age_days"
            )

    async def authorize(
        self, req: gw.AuthorizePaymentRequest, call: CallContext
    ) -> gw.AuthorizePaymentResponse:
        self._validate_authorize(req)
        core, tenant, key = self.core, req.tenant_id, req.idempotency_key
        fields, found = await core.remembered(tenant, AUTHORIZE, key, req)
        if found is not None:
            answer = gw.AuthorizePaymentResponse.FromString(found.body)
            answer.replayed = True
            return answer
        downstream_key = core.derive(tenant, AUTHORIZE, key, "authorize")
        evaluate, fallback_reason = await self._policy_request(req, downstream_key, call)
        try:
            evaluated = await core.policy.evaluate(
                evaluate, core.timeout_s(call, core.config.budgets.policy_budget_ms)
            )
            decision = evaluated.decision
        except TriplaneError as error:
            # The field named is the caller's; none when what differs is what
            # the gateway added to the snapshot (score, velocities, features).
            if not (error.code == Code.ALREADY_EXISTS and not error.field):
                raise
            # An earlier attempt under this key was decided on another context
            # and its journal was lost (a gateway crash inside one flush): the
            # decision already made is the one that stands, with its input.
            evaluate, decision = await self._decided_earlier(req, downstream_key, call)
            fallback_reason = ""
        answer = gw.AuthorizePaymentResponse(
            outcome=codec.outcome(decision),
            reasons=codec.reasons_of(decision),
            decision_id=decision.decision_id,
            policy_version=decision.bundle_version,
            model_score_ref=evaluate.snapshot.model_score,
            trace_id=call.trace_id,
            case_id=decision.case_id,
            obligations=codec.obligations_of(decision),
            route_method=decision.route.method,
            score_fallback_reason=fallback_reason,
            idempotency_key=key,
        )
        if decision.outcome == policy_pb2.OUTCOME_ALLOW:
            hold = await self._place_hold(req, decision, downstream_key, evaluate, call)
            answer.hold_id = hold.hold_id
            answer.hold_expires_at.CopyFrom(hold.expires_at)
        core.remember(tenant, AUTHORIZE, key, fields, answer)
        return answer

    async def _decided_earlier(
        self, req: gw.AuthorizePaymentRequest, downstream_key: str, call: CallContext
    ) -> tuple[policy_pb2.EvaluateRequest, policy_pb2.Decision]:
        core = self.core
        found = await core.policy.get_decision(
            policy_pb2.GetDecisionRequest(tenant_id=req.tenant_id, idempotency_key=downstream_key),
            core.timeout_s(call, core.config.budgets.policy_budget_ms),
        )
        if found.input.payment.amount != req.amount or (
            found.input.payment.account_id != req.account_id
        ):
            # The derived key is the caller's; another payment under it means
            # the caller reused its key (the remembered answer was lost too).
            field = "amount" if found.input.payment.amount != req.amount else "account_id"
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                f"idempotency key already used for another request ({field} differs)",
                field,
            )
        log.warning(
            "journal of %s lost; resuming with decision %s",
            req.idempotency_key,
            found.decision.decision_id,
        )
        core.store.put(
            f"{req.tenant_id}\x1f{AUTHORIZE}.input",
            req.idempotency_key,
            {"fallback_reason": ""},
            _journal_body(found.input),
        )
        return found.input, found.decision

    async def _policy_request(
        self, req: gw.AuthorizePaymentRequest, downstream_key: str, call: CallContext
    ) -> tuple[policy_pb2.EvaluateRequest, str]:
        """The policy request (journaled: a retry reuses it as it was sent)."""
        core, scope = self.core, f"{req.tenant_id}\x1f{AUTHORIZE}.input"
        journal = await core.store.get(scope, req.idempotency_key)
        if journal is not None:
            # The names were not journaled (no PII rests in the gateway's
            # store): the retry carries them again. Other names under the
            # same key make another request, which the policy plane refuses.
            evaluate = policy_pb2.EvaluateRequest.FromString(journal.body)
            evaluate.payment.customer.name = req.customer.name
            evaluate.payment.counterparty.name = req.counterparty.name
            return evaluate, journal.fields.get("fallback_reason", "")
        scored, fallback_reason = await self._score(req, call)
        evaluate = self._build_evaluate(req, downstream_key, scored)
        core.store.put(
            scope,
            req.idempotency_key,
            {"fallback_reason": fallback_reason},
            _journal_body(evaluate),
        )
        return evaluate, fallback_reason

    async def _score(
        self, req: gw.AuthorizePaymentRequest, call: CallContext
    ) -> tuple[ai_pb2.ScoreResponse | None, str]:
        core, tenant = self.core, req.tenant_id
        # PII inside the attributes (and the payment's own names anywhere in
        # them) is replaced by tokens before the AI plane sees it: it refuses
        # raw PII, and a refusal must never be the caller's way around a score.
        attributes = core.tokenizer.scrub(tenant, req.attributes, _names(req))
        if req.card_number:
            attributes["pan_token"] = core.tokenizer.token(tenant, "pan", req.card_number)
        request = ai_pb2.ScoreRequest(
            payment=ai_pb2.PaymentContext(
                tenant_id=tenant,
                account_id=req.account_id,
                device_id=core.tokenizer.token(tenant, "device", req.device_id),
                merchant_id=req.merchant_id,
                amount=req.amount,
                merchant_category=req.merchant_category,
                channel=int(req.channel),  # type: ignore[arg-type]
                attributes=attributes,
                # The customer's own hour: a payment in their night is not
                # judged as whatever hour it is in UTC.
                local_hour=self.local_hour(req.customer, core.clock.now_us()),
            )
        )
        try:
            timeout_s = core.timeout_s(call, core.config.budgets.ai_score_budget_ms)
            scored = await core.ai.score(request, timeout_s)
        except TriplaneError as error:
            if error.code in _CALLER_ERRORS:
                # The caller's request is what the AI plane refused: never a
                # way around the score (a missing score must not be a cheaper
                # path than a bad one), and bad input changes nothing.
                raise
            # Rule 3: the AI plane only enriches. No score is a case the policy
            # names (fraud_score_missing), never a failed authorization.
            log.info("no risk score: %s", error.reason)
            return None, error.reason or "AI_FAILED"
        return scored, scored.fallback_reason

    def _build_evaluate(
        self,
        req: gw.AuthorizePaymentRequest,
        downstream_key: str,
        scored: ai_pb2.ScoreResponse | None,
    ) -> policy_pb2.EvaluateRequest:
        core, tenant = self.core, req.tenant_id
        features = {f.name: f.value for f in scored.features} if scored is not None else {}
        if scored is not None:
            score_ref = scored.score_ref
        else:
            score_ref = types_pb2.ModelScoreRef(model=NO_SCORE_MODEL, source=SOURCE_NONE)
        customer = req.customer
        # The customer's KYC facts are not the caller's to declare: the policy
        # plane reads its profile by customer_id. Velocity is the AI plane's
        # count; with no score, or a feature store it could not read, the
        # counters stay unset, which the policy reads as unknown, never zero.
        snapshot = policy_pb2.ContextSnapshot(model_score=score_ref, features=features)
        if codec.features_counted(scored):
            snapshot.account_velocity.CopyFrom(codec.velocity(features, "acct"))
            snapshot.device_velocity.CopyFrom(codec.velocity(features, "dev"))
            snapshot.merchant_velocity.CopyFrom(codec.velocity(features, "merch"))
        payment = policy_pb2.Payment(
            account_id=req.account_id,
            kind=codec.KIND_TO_POLICY[req.kind],
            amount=req.amount,
            # Scanned like every string forwarded (the policy plane logs it).
            payment_method=core.tokenizer.scrub_text(tenant, req.payment_method, _names(req)),
            merchant_id=req.merchant_id,
            merchant_category=req.merchant_category,
            device_id=core.tokenizer.token(tenant, "device", req.device_id),
            # Names go to the policy plane in clear for sanctions screening
            # (inside the trust boundary, sealed in its decision log); never
            # to the AI plane, NATS or the gateway's store.
            customer=policy_pb2.Party(name=customer.name, country=customer.country),
            customer_id=customer.customer_id,
            counterparty=policy_pb2.Party(
                name=req.counterparty.name, country=req.counterparty.country
            ),
            # What the decision token will bind besides: the payee, and that
            # the money plane places a hold (whatever the kind of payment).
            credit_account_id=req.credit_account_id,
            movement=policy_pb2.MONEY_MOVEMENT_AUTHORIZE,
        )
        return policy_pb2.EvaluateRequest(
            tenant_id=tenant, idempotency_key=downstream_key, payment=payment, snapshot=snapshot
        )

    async def _place_hold(
        self,
        req: gw.AuthorizePaymentRequest,
        decision: policy_pb2.Decision,
        downstream_key: str,
        evaluate: policy_pb2.EvaluateRequest,
        call: CallContext,
    ) -> money_pb2.Hold:
        # Only what the request and its decision determine: the ledger compares
        # a retry's metadata with the first attempt's under the same key, so a
        # per-attempt value (the trace id) turned the retry of an authorization
        # whose answer was lost after its hold into IDEMPOTENCY_KEY_REUSED.
        metadata = {"decision_id": decision.decision_id}
        if req.merchant_id:
            metadata["merchant_id"] = req.merchant_id
        if evaluate.payment.device_id:
            # The AI plane's feature pipeline reads the device from the entry.
            metadata["device_id"] = evaluate.payment.device_id
        transfer = money_pb2.Transfer(
            idempotency_key=downstream_key,
            kind=money_pb2.TRANSFER_KIND_AUTHORIZE,
            debit_account_id=req.account_id,
            credit_account_id=req.credit_account_id,
            amount=req.amount,
            decision_token=decision.decision_token,
            hold_timeout_s=req.hold_timeout_s,
            metadata=metadata,
        )
        result = await self._transfer(req.tenant_id, transfer, call)
        return result.hold

    async def _transfer(
        self, tenant_id: str, transfer: money_pb2.Transfer, call: CallContext
    ) -> money_pb2.TransferResult:
        core = self.core
        response = await core.money.create_transfer(
            money_pb2.CreateTransferRequest(tenant_id=tenant_id, transfer=transfer),
            core.timeout_s(call, core.config.budgets.money_budget_ms),
        )
        result = response.result
        if result.HasField("error") and result.error.code != 0:
            raise money_error(result.error)
        return result

    # ---------------------------------------------------------------- capture, void, refund

    def _validate_common(self, tenant_id: str, key: str) -> None:
        validate.require_tenant_id(tenant_id)
        validate.require_id(key, "idempotency_key", self.limits)

    async def capture(
        self, req: gw.CapturePaymentRequest, call: CallContext
    ) -> gw.CapturePaymentResponse:
        self._validate_common(req.tenant_id, req.idempotency_key)
        validate.require_id(req.hold_id, "hold_id", self.limits)
        validate.check_money(req.amount, "amount", self.limits, required=False)

        async def run() -> gw.CapturePaymentResponse:
            transfer = money_pb2.Transfer(
                idempotency_key=self.core.derive(
                    req.tenant_id, "CapturePayment", req.idempotency_key, "capture"
                ),
                kind=money_pb2.TRANSFER_KIND_CAPTURE,
                hold_id=req.hold_id,
            )
            if req.HasField("amount"):
                transfer.amount.CopyFrom(req.amount)
            result = await self._transfer(req.tenant_id, transfer, call)
            return gw.CapturePaymentResponse(
                hold_id=req.hold_id,
                entry_id=result.entry.entry_id,
                captured=result.entry.amount,
                hold_state=codec.HOLD_STATE_FROM_MONEY.get(
                    result.hold.state, gw.HOLD_STATE_CAPTURED
                ),
                idempotency_key=req.idempotency_key,
            )

        return await self.core.idempotent(
            req.tenant_id,
            "CapturePayment",
            req.idempotency_key,
            req,
            gw.CapturePaymentResponse,
            run,
        )

    async def void(self, req: gw.VoidPaymentRequest, call: CallContext) -> gw.VoidPaymentResponse:
        self._validate_common(req.tenant_id, req.idempotency_key)
        validate.require_id(req.hold_id, "hold_id", self.limits)

        async def run() -> gw.VoidPaymentResponse:
            transfer = money_pb2.Transfer(
                idempotency_key=self.core.derive(
                    req.tenant_id, "VoidPayment", req.idempotency_key, "void"
                ),
                kind=money_pb2.TRANSFER_KIND_VOID,
                hold_id=req.hold_id,
            )
            result = await self._transfer(req.tenant_id, transfer, call)
            return gw.VoidPaymentResponse(
                hold_id=req.hold_id,
                hold_state=codec.HOLD_STATE_FROM_MONEY.get(result.hold.state, gw.HOLD_STATE_VOIDED),
                idempotency_key=req.idempotency_key,
            )

        return await self.core.idempotent(
            req.tenant_id, "VoidPayment", req.idempotency_key, req, gw.VoidPaymentResponse, run
        )

    async def refund(
        self, req: gw.RefundPaymentRequest, call: CallContext
    ) -> gw.RefundPaymentResponse:
        self._validate_common(req.tenant_id, req.idempotency_key)
        validate.require_id(req.entry_id, "entry_id", self.limits)
        validate.check_money(req.amount, "amount", self.limits, required=False)

        async def run() -> gw.RefundPaymentResponse:
            key = self.core.derive(req.tenant_id, "RefundPayment", req.idempotency_key, "refund")
            decision = await self._refund_decision(req, key, call)
            transfer = money_pb2.Transfer(
                idempotency_key=key,
                kind=money_pb2.TRANSFER_KIND_REFUND,
                entry_id=req.entry_id,
                decision_token=decision.decision_token,
            )
            if req.HasField("amount"):
                transfer.amount.CopyFrom(req.amount)
            result = await self._transfer(req.tenant_id, transfer, call)
            return gw.RefundPaymentResponse(
                refund_entry_id=result.entry.entry_id,
                entry_id=req.entry_id,
                refunded=result.entry.amount,
                idempotency_key=req.idempotency_key,
            )

        return await self.core.idempotent(
            req.tenant_id,
            "RefundPayment",
            req.idempotency_key,
            req,
            gw.RefundPaymentResponse,
            run,
        )

    async def _refund_decision(
        self, req: gw.RefundPaymentRequest, key: str, call: CallContext
    ) -> policy_pb2.Decision:
        """The policy's decision on a refund, made on the payment as the ledger
        holds it (its accounts, what it captured, what was refunded before):
        the caller names only the entry and the amount. Anything but allow is
        the refund refused, with the policy's reason."""
        core, tenant = self.core, req.tenant_id
        found = await core.money.get_entry(
            money_pb2.GetEntryRequest(tenant_id=tenant, entry_id=req.entry_id),
            core.timeout_s(call, core.config.budgets.money_budget_ms),
        )
        entry = found.entry
        left_minor = entry.amount.amount_minor - entry.refunded_minor
        if entry.kind not in _REFUNDABLE or not entry.credit_account_id:
            raise FailedPrecondition(
                "ENTRY_NOT_REFUNDABLE",
                "only transfers, payouts and captures are refundable",
                "entry_id",
            )
        if left_minor <= 0:
            raise FailedPrecondition(
                "ENTRY_FULLY_REFUNDED", "the entry was already refunded in full", "entry_id"
            )
        amount = (
            req.amount
            if req.HasField("amount")
            else types_pb2.Money(amount_minor=left_minor, currency=entry.amount.currency)
        )
        instrument = entry.postings[0].account_id
        evaluate = policy_pb2.EvaluateRequest(
            tenant_id=tenant,
            idempotency_key=key,
            payment=policy_pb2.Payment(
                # A refund takes the money back from the account the payment
                # credited and gives it to the one it debited.
                account_id=entry.credit_account_id,
                credit_account_id=instrument,
                kind=policy_pb2.PAYMENT_KIND_REFUND,
                movement=policy_pb2.MONEY_MOVEMENT_REFUND,
                amount=amount,
                refund=policy_pb2.RefundContext(
                    entry_id=entry.entry_id,
                    original_account_id=instrument,
                    captured_minor=entry.amount.amount_minor,
                    refunded_minor=entry.refunded_minor,
                    refund_count=entry.refund_count,
                ),
            ),
        )
        timeout_s = core.timeout_s(call, core.config.budgets.policy_budget_ms)
        try:
            decision = (
                await core.policy.evaluate(evaluate, timeout_s, fields.EVALUATE_REFUND)
            ).decision
        except TriplaneError as error:
            # A field the caller sent differs: its key was reused. None named:
            # what differs is the ledger's (this refund committed, its answer
            # was lost): the decision already made stands, and the money
            # plane answers the committed refund again under the same key.
            if not (error.code == Code.ALREADY_EXISTS and not error.field):
                raise
            decision = (
                await core.policy.get_decision(
                    policy_pb2.GetDecisionRequest(tenant_id=tenant, idempotency_key=key),
                    timeout_s,
                )
            ).decision
        if decision.outcome != policy_pb2.OUTCOME_ALLOW:
            reason = next(
                (r.reason_code for r in decision.fired_rules if r.outcome == decision.outcome),
                "REFUND_NOT_ALLOWED",
            )
            outcome = policy_pb2.Outcome.Name(decision.outcome).removeprefix("OUTCOME_").lower()
            case = f" (review case {decision.case_id})" if decision.case_id else ""
            raise FailedPrecondition(
                reason,
                f"the refund is not allowed: {outcome}, {reason}{case}",
                _REFUND_REASON_FIELDS.get(reason, "entry_id"),
            )
        return decision

    # ---------------------------------------------------------------- why

    async def get_decision(
        self, req: gw.GetDecisionRequest, call: CallContext
    ) -> gw.GetDecisionResponse:
        core = self.core
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.decision_id, "decision_id", self.limits)
        # Names in clear only for a caller allowed to read PII: the policy
        # plane is told so, and answers tokens to everyone else.
        principal = current_principal()
        reveal = principal is not None and principal.has_scope(PII_READ)
        found = await core.policy.get_decision(
            policy_pb2.GetDecisionRequest(
                tenant_id=req.tenant_id, decision_id=req.decision_id, reveal_pii=reveal
            ),
            core.timeout_s(call, core.config.budgets.policy_budget_ms),
        )
        decision, logged = found.decision, found.input
        score_ref = logged.snapshot.model_score
        answer = gw.GetDecisionResponse(
            decision_id=decision.decision_id,
            outcome=codec.outcome(decision),
            reasons=codec.reasons_of(decision),
            obligations=codec.obligations_of(decision),
            policy_version=decision.bundle_version,
            model_score_ref=score_ref,
            input=_decision_input(found, reveal),
            decided_at=decision.decided_at,
            case_id=decision.case_id,
            route_method=decision.route.method,
            log_sequence=decision.log_sequence,
        )
        if score_ref.source in ("", SOURCE_NONE) or not score_ref.score_id:
            answer.attributions_unavailable_reason = "NO_MODEL_SCORE"
            return answer
        try:
            explained = await core.ai.explain(
                ai_pb2.ExplainRequest(tenant_id=req.tenant_id, score_id=score_ref.score_id),
                core.timeout_s(call, core.config.budgets.ai_explain_budget_ms),
            )
        except TriplaneError as error:
            answer.attributions_unavailable_reason = error.reason or "AI_FAILED"
            return answer
        answer.attributions.extend(
            gw.Attribution(feature=a.feature, value=a.value, contribution=a.contribution)
            for a in explained.attributions
        )
        answer.features.extend(
            gw.FeatureValue(name=f.name, value=f.value) for f in explained.features
        )
        return answer


def _decision_input(found: policy_pb2.GetDecisionResponse, revealed: bool) -> gw.DecisionInput:
    payment, snapshot = found.input.payment, found.input.snapshot
    answer = gw.DecisionInput(
        account_id=payment.account_id,
        kind=codec.KIND_FROM_POLICY.get(payment.kind, gw.PAYMENT_KIND_UNSPECIFIED),
        amount=payment.amount,
        payment_method=payment.payment_method,
        merchant_id=payment.merchant_id,
        merchant_category=payment.merchant_category,
        device_id=payment.device_id,
        customer_name_token=found.customer_name_token,
        customer_country=payment.customer.country,
        counterparty_name_token=found.counterparty_name_token,
        counterparty_country=payment.counterparty.country,
        kyc_tier=snapshot.kyc.tier,
        features=dict(snapshot.features),
    )
    if revealed:
        answer.customer_name = payment.customer.name
        answer.counterparty_name = payment.counterparty.name
    return answer


_REFUNDABLE = frozenset(
    {
        money_pb2.TRANSFER_KIND_TRANSFER,
        money_pb2.TRANSFER_KIND_PAYOUT,
        money_pb2.TRANSFER_KIND_CAPTURE,
    }
)
# The caller's field a policy reason for refusing a refund is about.
_REFUND_REASON_FIELDS = {"REFUND_EXCEEDS_CAPTURED": "amount"}


def _pan_ok(value: str) -> bool:
    return looks_like_pan(value)


def _names(req: gw.AuthorizePaymentRequest) -> NameSet:
    return NameSet([req.customer.name, req.counterparty.name])


def _journal_body(evaluate: policy_pb2.EvaluateRequest) -> bytes:
    """The policy request as the gateway keeps it: without the names."""
    journaled = policy_pb2.EvaluateRequest()
    journaled.CopyFrom(evaluate)
    journaled.payment.customer.name = ""
    journaled.payment.counterparty.name = ""
    return journaled.SerializeToString(deterministic=True)
