"""Beneficiaries and payouts: money out of a seller's balance.

CreateBeneficiary: validate -> tokenize the account number and the holder's
name -> the money plane validates the destination (bank formats) and keeps
the clear values sealed; the gateway keeps nothing of them (its idempotency
memory is a keyed hash per field).

CreatePayout: validate -> the money plane's payout context (the beneficiary,
its holder's name in clear for screening, its payouts so far, the account's
available balance, its payout velocity and what each rail offers this
amount now: reach, limit, window, cost) -> policy Evaluate (PAYOUT, the
merchant's KYC profile by merchant_id, the beneficiary screened as the
counterparty, the ledger's and the rails' facts as the snapshot: the
decision's route names the rail and its alternates) -> on allow the money
plane records the payout on that rail and debits the account into
payouts-in-flight under the signed decision; on review or hold a PENDING_REVIEW payout (nothing
moved) and the case; on deny the reasons and nothing recorded. Every
downstream key is derived from the caller's; the policy request is
journaled (without the name) before it is sent, so a retry replays the same
decision and the same payout.
"""

from __future__ import annotations

import logging
from typing import Protocol

from gateway import codec, validate
from gateway.core import CallContext, Core
from gateway.delivery.model import Delivery
from gateway.fields import FieldMap
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.money.v1 import money_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime import pii as runtime_pii
from triplane.runtime.errors import Code, FailedPrecondition, InvalidArgument, TriplaneError

log = logging.getLogger("gateway.payouts")

CREATE_BENEFICIARY = "CreateBeneficiary"
CREATE_PAYOUT = "CreatePayout"
NO_SCORE_MODEL = "payment_risk"
# The ledger's facts the default bundle's payout rules read (snapshot.features).
FEATURE_AVAILABLE = "payout_available_minor"
FEATURE_BENEFICIARY_PAYOUTS = "payout_beneficiary_payouts"

BENEFICIARY_FIELDS = FieldMap(
    {
        "tenant_id": "tenant_id",
        "beneficiary.beneficiary_id": "beneficiary_id",
        "beneficiary.merchant_id": "merchant_id",
        "beneficiary.holder_name": "holder_name",
        "beneficiary.country": "country",
        "beneficiary.iban": "iban",
        "beneficiary.bic": "bic",
        "beneficiary.routing_number": "routing_number",
        "beneficiary.account_number": "account_number",
        "beneficiary.account_type": "account_type",
        "beneficiary.kind": "token_kind",
        "beneficiary.token": "token",
    }
)
PAYOUT_FIELDS = FieldMap(
    {
        "tenant_id": "tenant_id",
        "idempotency_key": "idempotency_key",
        "beneficiary_id": "beneficiary_id",
        "merchant_id": "merchant_id",
        "debit_account_id": "account_id",
        "account_id": "account_id",
        "amount": "amount",
        "description": "description",
        "payout.debit_account_id": "account_id",
        "payout.amount": "amount",
        "payout.idempotency_key": "idempotency_key",
        "payment.account_id": "account_id",
        "payment.amount": "amount",
        "payment.customer_id": "merchant_id",
        "payment.counterparty": "beneficiary_id",
    }
)
STATE_FROM_MONEY = {
    money_pb2.PAYOUT_STATE_PENDING_REVIEW: gw.PAYOUT_STATE_PENDING_REVIEW,
    money_pb2.PAYOUT_STATE_APPROVED: gw.PAYOUT_STATE_APPROVED,
    money_pb2.PAYOUT_STATE_SUBMITTED: gw.PAYOUT_STATE_SUBMITTED,
    money_pb2.PAYOUT_STATE_SETTLED: gw.PAYOUT_STATE_SETTLED,
    money_pb2.PAYOUT_STATE_RETURNED: gw.PAYOUT_STATE_RETURNED,
    money_pb2.PAYOUT_STATE_FAILED: gw.PAYOUT_STATE_FAILED,
}


class PayoutsMoneyPort(Protocol):
    async def call(
        self, method: str, request: object, timeout_s: float, field_map: FieldMap
    ) -> object:
        """The money plane's `method` with `request` (errors naming the
        gateway request's fields per `field_map`)."""
        ...


class Webhooks(Protocol):
    def endpoint(self, tenant_id: str, customer_id: str, channel: str) -> str: ...


class DeliveryQueue(Protocol):
    async def enqueue(self, delivery: Delivery) -> object: ...


def beneficiary_of(value: money_pb2.Beneficiary) -> gw.Beneficiary:
    return gw.Beneficiary(
        beneficiary_id=value.beneficiary_id,
        merchant_id=value.merchant_id,
        country=value.country,
        kind=value.kind,
        masked=value.masked,
        bic=value.bic,
        routing_number=value.routing_number,
        created_at=value.created_at,
    )


def payout_of(value: money_pb2.Payout) -> gw.Payout:
    return gw.Payout(
        payout_id=value.payout_id,
        beneficiary_id=value.beneficiary_id,
        merchant_id=value.merchant_id,
        account_id=value.debit_account_id,
        amount=value.amount,
        state=STATE_FROM_MONEY.get(value.state, gw.PAYOUT_STATE_UNSPECIFIED),
        decision_id=value.decision_id,
        case_id=value.case_id,
        rail=value.rail,
        end_to_end_id=value.end_to_end_id,
        reason_code=value.reason_code,
        reason=value.reason,
        created_at=value.created_at,
        updated_at=value.updated_at,
        alternate_rails=value.alternate_rails,
        attempts=[
            gw.PayoutAttempt(rail=a.rail, reason_code=a.reason_code, failed_at=a.failed_at)
            for a in value.attempts
        ],
    )


def payout_webhook_payload(value: money_pb2.Payout) -> dict[str, object]:
    """What the partner's webhook says of a payout (no account number, no name)."""
    return {
        "payout_id": value.payout_id,
        "state": gw.PayoutState.Name(STATE_FROM_MONEY.get(value.state, gw.PAYOUT_STATE_UNSPECIFIED))
        .removeprefix("PAYOUT_STATE_")
        .lower(),
        "beneficiary_id": value.beneficiary_id,
        "merchant_id": value.merchant_id,
        "account_id": value.debit_account_id,
        "amount_minor": value.amount.amount_minor,
        "currency": value.amount.currency,
        "end_to_end_id": value.end_to_end_id,
        "reason_code": value.reason_code,
        "rail": value.rail,
        # Rails that failed it and it was re-routed from (the partner sees
        # an `approved` again after `submitted` when it moves on).
        "attempts": [{"rail": a.rail, "reason_code": a.reason_code} for a in value.attempts],
    }


class Payouts:
    def __init__(
        self,
        core: Core,
        money: PayoutsMoneyPort,
        webhooks: Webhooks | None = None,
        deliveries: DeliveryQueue | None = None,
    ) -> None:
        self.core = core
        self.money = money
        self.limits = core.config.limits
        self._webhooks = webhooks
        self._deliveries = deliveries

    def _money_timeout(self, call: CallContext) -> float:
        return self.core.timeout_s(call, self.core.config.budgets.money_budget_ms)

    # ---------------------------------------------------------------- beneficiaries

    def _validate_beneficiary(self, req: gw.CreateBeneficiaryRequest) -> str:
        limits = self.limits
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.idempotency_key, "idempotency_key", limits)
        validate.require_id(req.beneficiary_id, "beneficiary_id", limits)
        validate.require_id(req.merchant_id, "merchant_id", limits)
        validate.check_string(req.holder_name, "holder_name", limits)
        if not req.holder_name:
            raise InvalidArgument("FIELD_REQUIRED", "holder_name is required", "holder_name")
        validate.check_country(req.country, "country")
        if not req.country:
            raise InvalidArgument("FIELD_REQUIRED", "country is required", "country")
        for name in ("iban", "bic", "routing_number", "account_number", "account_type"):
            validate.check_string(getattr(req, name), name, limits)
        validate.check_string(req.token_kind, "token_kind", limits)
        validate.check_string(req.token, "token", limits)
        given = [
            kind
            for kind, present in (
                ("iban", bool(req.iban)),
                ("us_bank", bool(req.routing_number or req.account_number)),
                ("token", bool(req.token or req.token_kind)),
            )
            if present
        ]
        if len(given) != 1:
            raise InvalidArgument(
                "DESTINATION_REQUIRED",
                "exactly one destination: iban, routing_number + account_number, or "
                "token_kind + token",
                "iban",
            )
        return given[0]

    async def create_beneficiary(
        self, req: gw.CreateBeneficiaryRequest, call: CallContext
    ) -> gw.CreateBeneficiaryResponse:
        kind = self._validate_beneficiary(req)
        core, tenant = self.core, req.tenant_id

        async def run() -> gw.CreateBeneficiaryResponse:
            tokenizer = core.tokenizer
            account = req.iban or req.account_number or req.token
            token_kind = runtime_pii.IBAN if kind == "iban" else "bank_account"
            if kind == "token":
                token_kind = "vault_token"
            new = money_pb2.NewBeneficiary(
                beneficiary_id=req.beneficiary_id,
                merchant_id=req.merchant_id,
                # In clear to the money plane (inside the trust boundary),
                # which seals them; tokens for everything else.
                holder_name=req.holder_name,
                country=req.country,
                account_token=tokenizer.token(tenant, token_kind, account),
                holder_name_token=tokenizer.token(tenant, "name", req.holder_name),
            )
            if kind == "iban":
                new.iban.CopyFrom(money_pb2.IbanDestination(iban=req.iban, bic=req.bic))
            elif kind == "us_bank":
                new.us_bank.CopyFrom(
                    money_pb2.UsBankDestination(
                        routing_number=req.routing_number,
                        account_number=req.account_number,
                        account_type=req.account_type,
                    )
                )
            else:
                new.token.CopyFrom(money_pb2.TokenDestination(kind=req.token_kind, token=req.token))
            made = await self.money.call(
                "CreateBeneficiary",
                money_pb2.CreateBeneficiaryRequest(tenant_id=tenant, beneficiary=new),
                self._money_timeout(call),
                BENEFICIARY_FIELDS,
            )
            assert isinstance(made, money_pb2.CreateBeneficiaryResponse)
            return gw.CreateBeneficiaryResponse(
                beneficiary=beneficiary_of(made.beneficiary), idempotency_key=req.idempotency_key
            )

        return await core.idempotent(
            tenant, CREATE_BENEFICIARY, req.idempotency_key, req, gw.CreateBeneficiaryResponse, run
        )

    async def get_beneficiary(
        self, req: gw.GetBeneficiaryRequest, call: CallContext
    ) -> gw.GetBeneficiaryResponse:
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.beneficiary_id, "beneficiary_id", self.limits)
        found = await self.money.call(
            "GetBeneficiary",
            money_pb2.GetBeneficiaryRequest(
                tenant_id=req.tenant_id, beneficiary_id=req.beneficiary_id
            ),
            self._money_timeout(call),
            PAYOUT_FIELDS,
        )
        assert isinstance(found, money_pb2.GetBeneficiaryResponse)
        return gw.GetBeneficiaryResponse(beneficiary=beneficiary_of(found.beneficiary))

    # ---------------------------------------------------------------- payouts

    def _validate_payout(self, req: gw.CreatePayoutRequest) -> None:
        limits = self.limits
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.idempotency_key, "idempotency_key", limits)
        validate.require_id(req.merchant_id, "merchant_id", limits)
        validate.require_id(req.account_id, "account_id", limits)
        validate.require_id(req.beneficiary_id, "beneficiary_id", limits)
        validate.check_money(req.amount, "amount", limits, required=True)
        validate.check_string(req.description, "description", limits)
        validate.check_no_pii(req.description, "description")

    async def create_payout(
        self, req: gw.CreatePayoutRequest, call: CallContext
    ) -> gw.CreatePayoutResponse:
        self._validate_payout(req)
        core, tenant, key = self.core, req.tenant_id, req.idempotency_key
        fields_, found = await core.remembered(tenant, CREATE_PAYOUT, key, req)
        if found is not None:
            answer = gw.CreatePayoutResponse.FromString(found.body)
            answer.replayed = True
            return answer
        downstream_key = core.derive(tenant, CREATE_PAYOUT, key, "payout")
        context = await self.money.call(
            "GetPayoutContext",
            money_pb2.GetPayoutContextRequest(
                tenant_id=tenant,
                beneficiary_id=req.beneficiary_id,
                debit_account_id=req.account_id,
                amount=req.amount,
            ),
            self._money_timeout(call),
            PAYOUT_FIELDS,
        )
        assert isinstance(context, money_pb2.GetPayoutContextResponse)
        if context.beneficiary.merchant_id != req.merchant_id:
            raise FailedPrecondition(
                "BENEFICIARY_NOT_MERCHANTS",
                "the beneficiary belongs to another merchant",
                "beneficiary_id",
            )
        if context.currency != req.amount.currency:
            raise InvalidArgument(
                "CURRENCY_MISMATCH",
                f"account_id holds {context.currency}, not {req.amount.currency}",
                "amount.currency",
            )
        evaluate = await self._policy_request(req, downstream_key, context)
        evaluated = await core.policy.evaluate(
            evaluate, core.timeout_s(call, core.config.budgets.policy_budget_ms), PAYOUT_FIELDS
        )
        decision = evaluated.decision
        answer = gw.CreatePayoutResponse(
            outcome=codec.outcome(decision),
            reasons=codec.reasons_of(decision),
            decision_id=decision.decision_id,
            policy_version=decision.bundle_version,
            case_id=decision.case_id,
            trace_id=call.trace_id,
            idempotency_key=key,
        )
        if decision.outcome != policy_pb2.OUTCOME_DENY:
            allowed = decision.outcome == policy_pb2.OUTCOME_ALLOW
            created = await self.money.call(
                "CreatePayout",
                money_pb2.CreatePayoutRequest(
                    tenant_id=tenant,
                    idempotency_key=downstream_key,
                    beneficiary_id=req.beneficiary_id,
                    merchant_id=req.merchant_id,
                    debit_account_id=req.account_id,
                    amount=req.amount,
                    decision_token=decision.decision_token if allowed else "",
                    pending_review=not allowed,
                    decision_id=decision.decision_id,
                    case_id=decision.case_id,
                    # The rail the policy chose among the money plane's
                    # options (a bundle without rail routes: the method).
                    rail=decision.route.rail or decision.route.method,
                    alternate_rails=decision.route.alternates,
                    description=req.description,
                ),
                self._money_timeout(call),
                PAYOUT_FIELDS,
            )
            assert isinstance(created, money_pb2.CreatePayoutResponse)
            answer.payout.CopyFrom(payout_of(created.payout))
            await self.notify(created.payout)
        core.remember(tenant, CREATE_PAYOUT, key, fields_, answer)
        return answer

    async def _policy_request(
        self,
        req: gw.CreatePayoutRequest,
        downstream_key: str,
        context: money_pb2.GetPayoutContextResponse,
    ) -> policy_pb2.EvaluateRequest:
        """The policy request, journaled without the name: a retry sends what
        the first attempt sent (the ledger's facts may have moved since)."""
        core, scope = self.core, f"{req.tenant_id}\x1f{CREATE_PAYOUT}.input"
        journal = await core.store.get(scope, req.idempotency_key)
        if journal is not None:
            evaluate = policy_pb2.EvaluateRequest.FromString(journal.body)
            evaluate.payment.counterparty.name = context.holder_name
            return evaluate
        velocity = policy_pb2.VelocityCounters(
            count_1h=context.payouts_count_1h,
            count_24h=context.payouts_count_24h,
            count_30d=context.payouts_count_30d,
            amount_minor_1h=context.payouts_amount_minor_1h,
            amount_minor_24h=context.payouts_amount_minor_24h,
            amount_minor_30d=context.payouts_amount_minor_30d,
        )
        snapshot = policy_pb2.ContextSnapshot(
            # Payouts are not scored by the payment risk model.
            model_score=types_pb2.ModelScoreRef(model=NO_SCORE_MODEL, source="none"),
            account_velocity=velocity,
            features={
                FEATURE_AVAILABLE: float(context.available_minor),
                FEATURE_BENEFICIARY_PAYOUTS: float(context.beneficiary_payouts),
            },
            # What each rail offers this payout now: the bundle's rail routes
            # choose among them (journaled with the rest: a retry routes the
            # same).
            rails=context.rail_options,
        )
        payment = policy_pb2.Payment(
            account_id=req.account_id,
            kind=policy_pb2.PAYMENT_KIND_PAYOUT,
            amount=req.amount,
            customer_id=req.merchant_id,
            # The beneficiary is screened as the payment's counterparty (its
            # name in clear inside the trust boundary, sealed in the log).
            counterparty=policy_pb2.Party(
                name=context.holder_name, country=context.beneficiary.country
            ),
            credit_account_id=context.in_flight_account_id,
            movement=policy_pb2.MONEY_MOVEMENT_PAYOUT,
        )
        evaluate = policy_pb2.EvaluateRequest(
            tenant_id=req.tenant_id,
            idempotency_key=downstream_key,
            payment=payment,
            snapshot=snapshot,
        )
        journaled = policy_pb2.EvaluateRequest()
        journaled.CopyFrom(evaluate)
        journaled.payment.counterparty.name = ""
        core.store.put(
            scope, req.idempotency_key, {}, journaled.SerializeToString(deterministic=True)
        )
        return evaluate

    async def get_payout(self, req: gw.GetPayoutRequest, call: CallContext) -> gw.GetPayoutResponse:
        validate.require_tenant_id(req.tenant_id)
        validate.require_id(req.payout_id, "payout_id", self.limits)
        found = await self.money.call(
            "GetPayout",
            money_pb2.GetPayoutRequest(tenant_id=req.tenant_id, payout_id=req.payout_id),
            self._money_timeout(call),
            FieldMap({"tenant_id": "tenant_id", "payout_id": "payout_id"}),
        )
        assert isinstance(found, money_pb2.GetPayoutResponse)
        return gw.GetPayoutResponse(payout=payout_of(found.payout))

    # ---------------------------------------------------------------- webhooks

    async def notify(self, payout: money_pb2.Payout) -> None:
        """The partner's webhook for a payout's state (once per payout and
        state: the delivery's dedupe key). Nowhere configured: nothing."""
        if self._webhooks is None or self._deliveries is None:
            return
        endpoint = self._webhooks.endpoint(payout.tenant_id, "", "partner_webhook")
        if not endpoint:
            return
        payload = payout_webhook_payload(payout)
        try:
            await self._deliveries.enqueue(
                Delivery(
                    tenant_id=payout.tenant_id,
                    channel="partner_webhook",
                    endpoint=endpoint,
                    event_type=f"payout.{payload['state']}",
                    payload=payload,
                    dedupe_key=f"payout:{payout.payout_id}:{payload['state']}",
                )
            )
        except TriplaneError as error:
            if error.code != Code.RESOURCE_EXHAUSTED:
                raise
            # The payout stands; the webhook is lost only to a full queue,
            # which the delivery metrics show.
            log.warning("payout webhook not queued: %s", error.reason)
