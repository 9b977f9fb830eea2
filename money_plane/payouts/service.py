"""Payouts as the servicer sees them: validation, then the ledger's writer.

Every write runs on the ledger's writer thread (SQLite has one writer; on
PostgreSQL the same connection discipline as the group commit) in one
transaction with the ledger entry it goes with (money_plane/payouts/store.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import msgspec

from money_plane.domain import (
    AccountSpec,
    Command,
    Constraint,
    Kind,
    Leg,
    LegKind,
    check_id,
    check_tenant_id,
    check_text,
    scoped_key,
)
from money_plane.engine import Job
from money_plane.ledger import Ledger
from money_plane.payouts import store as rows
from money_plane.payouts.domain import (
    Beneficiary,
    NewBeneficiary,
    NotRerouted,
    Payout,
    PayoutOutcome,
    PayoutState,
    Rail,
    RailSubmission,
    build_beneficiary,
    end_to_end_id_for,
    holder_name_of,
    payout_id_for,
    rail_submission,
    rerouted,
    transition,
)
from money_plane.payouts.settlement import (
    DAY_US,
    Frequency,
    Netting,
    Period,
    Schedule,
    check_schedule,
    is_business_day,
    latest_closed_period,
    net,
)
from money_plane.payouts.store import PayoutEventEncoder
from money_plane.rails.adapters import RailOption, rail_capabilities, rail_options
from money_plane.recon.model import Direction, ExpectedPayment, ExpectedState
from money_plane.recon.store import ReconStore
from money_plane.recon.store import Tx as ReconTx
from triplane.runtime import codec as wire
from triplane.runtime.config import PayoutsConfig, RailsConfig
from triplane.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TriplaneError,
)
from triplane.runtime.secret_files import (
    FieldCipher,
    SecretError,
    random_key_b64,
    secret_path,
)

log = logging.getLogger("triplane.money.payouts")
KEYS_FILE = "money-payouts.keys"
_COUNTRY = re.compile(r"[A-Z]{2}")
HOUR_US = 3_600_000_000
# A payout's alternate rails (its decision's route: one per other rail).
MAX_ALTERNATE_RAILS = 8
# Routing choices (and rail names) the bank books the day they are handed
# over; every other one (ACH, SEPA, bank_transfer) by the next business day.
SAME_DAY_RAILS = frozenset({"instant_payment", "instant", "card", "wallet"})
# A payout its review declined: failed with this reason code, nothing posted.
REVIEW_DECLINED = "REVIEW_DECLINED"
# Expected payments a payout's end leaves open no longer (a booked one is
# matched; a returned-after-booking one is the bank's return line's).
_WITHDRAWABLE = (ExpectedState.OPEN, ExpectedState.OVERDUE)


def expected_id_for(payout_id: str) -> str:
    """The reconciliation expected payment of a payout (one per payout)."""
    return f"payout:{payout_id}"


def expected_window(rail: str, now_us: int) -> tuple[str, str]:
    """The days the bank should book a payout handed to `rail` now (UTC):
    the same day for instant rails and card pushes, else through the next
    business day (an ACH / SEPA file goes at the next cut-off and settles
    on its effective date). Recon's `grace_days` is added when it ages."""
    day = dt.datetime.fromtimestamp(now_us / 1_000_000, dt.UTC).date()
    if rail in SAME_DAY_RAILS:
        return day.isoformat(), day.isoformat()
    last = day + dt.timedelta(days=1)
    while not is_business_day(last, ""):
        last += dt.timedelta(days=1)
    return day.isoformat(), last.isoformat()


def load_cipher(config: PayoutsConfig, state_dir: Path) -> FieldCipher:
    """The key ring sealing beneficiaries (the dev stack's is made once)."""
    path = secret_path(config.keys_path, state_dir, KEYS_FILE, random_key_b64)
    try:
        return FieldCipher.from_file(path)
    except SecretError as exc:
        raise SecretError(f"money.payouts.keys_path: {exc}") from None


@dataclass(frozen=True, slots=True)
class PayoutContext:
    beneficiary: Beneficiary
    holder_name: str
    beneficiary_payouts: int
    available_minor: int
    currency: str
    # (count, amount) over 1 h, 24 h and 30 days.
    velocity: list[tuple[int, int]]
    in_flight_account_id: str
    rail_options: list[RailOption] = dataclass_field(default_factory=list)


class Payouts:
    def __init__(
        self,
        ledger: Ledger,
        cipher: FieldCipher,
        config: PayoutsConfig,
        encode_event: PayoutEventEncoder,
        rails: RailsConfig | None = None,
    ) -> None:
        self.ledger = ledger
        # What each rail offers a payout (GetPayoutContext's rail options).
        self.rail_capabilities = rail_capabilities(rails or RailsConfig())
        self._store = ledger.store
        self._cipher = cipher
        self.config = config
        self._encode_event = encode_event
        self._clock = ledger.clock
        self._recon = ReconStore(ledger.store)
        self._recon_ready = False

    def in_flight_account(self, currency: str) -> str:
        return f"{self.config.in_flight_account_prefix}:{currency}"

    def bank_account(self, currency: str) -> str:
        return f"{self.config.bank_account_prefix}:{currency}"

    def _check_id(self, value: str, field: str) -> None:
        check_id(value, field, self.ledger.config.limits)

    # ---- beneficiaries ----

    async def create_beneficiary(
        self, tenant_id: str, new: NewBeneficiary
    ) -> tuple[Beneficiary, bool]:
        check_tenant_id(tenant_id)
        self._check_id(new.beneficiary_id, "beneficiary.beneficiary_id")
        self._check_id(new.merchant_id, "beneficiary.merchant_id")
        check_text(new.holder_name, "beneficiary.holder_name", self.ledger.config.limits)
        if not _COUNTRY.fullmatch(new.country):
            raise InvalidArgument(
                "COUNTRY_INVALID",
                "beneficiary.country must be ISO 3166-1 alpha-2",
                "beneficiary.country",
            )
        beneficiary = build_beneficiary(tenant_id, new, self._cipher, self._clock.now_us())
        if not await self.ledger.run_on_writer(lambda: self._store.tenant_exists(tenant_id)):
            raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", "tenant_id")
        return await self.ledger.run_on_writer(
            lambda: rows.insert_beneficiary(self._store, beneficiary)
        )

    async def get_beneficiary(self, tenant_id: str, beneficiary_id: str) -> Beneficiary:
        check_tenant_id(tenant_id)
        self._check_id(beneficiary_id, "beneficiary_id")
        found = await self.ledger.run_on_writer(
            lambda: rows.get_beneficiary(self._store, tenant_id, beneficiary_id)
        )
        if found is None:
            raise NotFound(
                "BENEFICIARY_NOT_FOUND", f"no beneficiary {beneficiary_id!r}", "beneficiary_id"
            )
        return found

    # ---- payouts ----

    async def context(
        self, tenant_id: str, beneficiary_id: str, debit_account_id: str, amount_minor: int = 0
    ) -> PayoutContext:
        """The facts the payout's policy decision reads; with an amount,
        what each rail offers it now (the plane's clock)."""
        if amount_minor < 0:
            raise InvalidArgument(
                "AMOUNT_NOT_POSITIVE", "amount must be positive", "amount.amount_minor"
            )
        beneficiary = await self.get_beneficiary(tenant_id, beneficiary_id)
        account = await self.ledger.get_account(tenant_id, debit_account_id)
        now_us = self._clock.now_us()
        store = self._store
        paid = await self.ledger.run_on_writer(
            lambda: rows.beneficiary_payouts(store, tenant_id, beneficiary_id)
        )
        windows = [now_us - HOUR_US, now_us - 24 * HOUR_US, now_us - 30 * 24 * HOUR_US]
        velocity = await self.ledger.run_on_writer(
            lambda: rows.payout_velocity(store, tenant_id, debit_account_id, windows)
        )
        return PayoutContext(
            beneficiary=beneficiary,
            holder_name=holder_name_of(beneficiary, self._cipher),
            beneficiary_payouts=paid,
            available_minor=account.credits_posted - account.debits_posted - account.debits_pending,
            currency=account.currency,
            velocity=velocity,
            in_flight_account_id=self.in_flight_account(account.currency),
            rail_options=rail_options(
                self.rail_capabilities,
                currency=account.currency,
                amount_minor=amount_minor,
                beneficiary_kind=beneficiary.kind,
                country=beneficiary.country,
                now_us=now_us,
            )
            if amount_minor
            else [],
        )

    async def _open_accounts(self, tenant_id: str, currency: str) -> None:
        """The currency's in-flight and bank accounts (idempotent)."""
        await self.ledger.create_accounts(
            tenant_id,
            [
                AccountSpec(
                    account_id=self.in_flight_account(currency),
                    currency=currency,
                    kind=2,  # liability: the merchants' money on its way out
                    constraint=Constraint.DEBITS_MUST_NOT_EXCEED_CREDITS,
                    overdraft_limit_minor=0,
                    metadata={"role": "payouts_in_flight"},
                ),
                AccountSpec(
                    account_id=self.bank_account(currency),
                    currency=currency,
                    kind=1,  # asset: the platform's bank account
                    constraint=Constraint.NONE,
                    overdraft_limit_minor=0,
                    metadata={"role": "payouts_bank"},
                ),
            ],
        )

    async def create_payout(
        self,
        tenant_id: str,
        idempotency_key: str,
        *,
        beneficiary_id: str,
        merchant_id: str,
        debit_account_id: str,
        amount_minor: int,
        currency: str,
        decision_token: str,
        pending_review: bool,
        decision_id: str = "",
        case_id: str = "",
        rail: str = "",
        description: str = "",
        alternate_rails: Sequence[str] = (),
    ) -> tuple[Payout, bool]:
        check_tenant_id(tenant_id)
        limits = self.ledger.config.limits
        self._check_id(idempotency_key, "idempotency_key")
        if len(alternate_rails) > MAX_ALTERNATE_RAILS:
            raise InvalidArgument(
                "TOO_MANY_RAILS",
                f"at most {MAX_ALTERNATE_RAILS} alternate rails",
                "alternate_rails",
            )
        for index, name in enumerate(alternate_rails):
            self._check_id(name, f"alternate_rails[{index}]")
        self._check_id(beneficiary_id, "beneficiary_id")
        self._check_id(merchant_id, "merchant_id")
        self._check_id(debit_account_id, "debit_account_id")
        check_text(description, "description", limits)
        wire.check_currency(currency, "amount.currency")
        if amount_minor <= 0:
            raise InvalidArgument(
                "AMOUNT_NOT_POSITIVE", "amount must be positive", "amount.amount_minor"
            )
        if pending_review == bool(decision_token):
            raise InvalidArgument(
                "DECISION_TOKEN_REQUIRED",
                "an approved payout carries its decision token; one pending review none",
                "decision_token",
            )
        beneficiary = await self.get_beneficiary(tenant_id, beneficiary_id)
        if beneficiary.merchant_id != merchant_id:
            raise FailedPrecondition(
                "BENEFICIARY_NOT_MERCHANTS",
                "the beneficiary belongs to another merchant",
                "beneficiary_id",
            )
        now_us = self._clock.now_us()
        payout_id = payout_id_for(tenant_id, idempotency_key)
        payout = Payout(
            tenant_id=tenant_id,
            payout_id=payout_id,
            idempotency_key=idempotency_key,
            beneficiary_id=beneficiary_id,
            merchant_id=merchant_id,
            debit_account_id=debit_account_id,
            amount_minor=amount_minor,
            currency=currency,
            state=PayoutState.PENDING_REVIEW if pending_review else PayoutState.APPROVED,
            decision_id=decision_id,
            case_id=case_id,
            rail=rail,
            end_to_end_id=end_to_end_id_for(payout_id),
            created_at_us=now_us,
            updated_at_us=now_us,
            description=description,
            alternate_rails=list(alternate_rails),
        )
        job: Job | None = None
        if not pending_review:
            await self._open_accounts(tenant_id, currency)
            command = Command(
                tenant_id=tenant_id,
                idempotency_key=idempotency_key,
                kind=Kind.PAYOUT,
                debit_account_id=debit_account_id,
                credit_account_id=self.in_flight_account(currency),
                amount_minor=amount_minor,
                currency=currency,
                decision_token=decision_token,
                metadata={"payout_id": payout_id, "beneficiary_id": beneficiary_id},
            )
            job = self.ledger.prepare_job(tenant_id, [command], ["payout"])
        return await self.ledger.run_on_writer(
            lambda: rows.insert_payout(self._store, payout, job, now_us, self._encode_event)
        )

    async def get_payout(self, tenant_id: str, payout_id: str) -> Payout:
        check_tenant_id(tenant_id)
        self._check_id(payout_id, "payout_id")
        found = await self.ledger.run_on_writer(
            lambda: rows.get_payout(self._store, tenant_id, payout_id)
        )
        if found is None:
            raise NotFound("PAYOUT_NOT_FOUND", f"no payout {payout_id!r}", "payout_id")
        return found

    async def record_outcome(
        self,
        tenant_id: str,
        payout_id: str,
        outcome: int,
        *,
        reason_code: str = "",
        reason: str = "",
        rail_reference: str = "",
    ) -> tuple[Payout, bool]:
        """A rail's outcome: the ledger effect posts once, with the state."""
        check_tenant_id(tenant_id)
        self._check_id(payout_id, "payout_id")
        limits = self.ledger.config.limits
        try:
            kind = PayoutOutcome(outcome)
        except ValueError:
            raise InvalidArgument(
                "FIELD_REQUIRED", "outcome: settled, returned or failed", "outcome"
            ) from None
        if kind != PayoutOutcome.SETTLED:
            self._check_id(reason_code, "reason_code")
        check_text(reason, "reason", limits)
        check_text(rail_reference, "rail_reference", limits)
        now_us = self._clock.now_us()

        def decide(payout: Payout) -> tuple[Payout, Job | None, str] | None:
            move = transition(PayoutState(payout.state), kind)
            if move.replay:
                return None
            assert move.debit is not None and move.credit is not None
            accounts = {
                "in_flight": self.in_flight_account(payout.currency),
                "bank": self.bank_account(payout.currency),
                "merchant": payout.debit_account_id,
            }
            settling = kind == PayoutOutcome.SETTLED
            command = Command(
                tenant_id=tenant_id,
                idempotency_key=f"payout-{'settle' if settling else 'reverse'}:{payout_id}",
                kind=Kind.PAYOUT_SETTLEMENT if settling else Kind.PAYOUT_REVERSAL,
                debit_account_id=accounts[move.debit],
                credit_account_id=accounts[move.credit],
                amount_minor=payout.amount_minor,
                currency=payout.currency,
                metadata={"payout_id": payout_id, "reason_code": reason_code},
            )
            job = Job(tenant_id=tenant_id, commands=[command], fields=["outcome"])
            updated = msgspec.structs.replace(
                payout,
                state=move.target,
                updated_at_us=now_us,
                reason_code=reason_code,
                reason=reason,
                rail_reference=rail_reference or payout.rail_reference,
            )
            return updated, job, "settlement_entry_id" if settling else "reversal_entry_id"

        def withdraw(cur: object, before: Payout, after: Payout) -> None:
            # Before booking (approved / submitted -> failed / returned); a
            # return after settlement is the bank's return line's to match.
            if kind != PayoutOutcome.SETTLED and before.state != PayoutState.SETTLED:
                self._withdraw_expected(ReconTx(self._store, cur), after)

        await self._ensure_recon_schema()
        found = await self.ledger.run_on_writer(
            lambda: rows.update_payout(
                self._store, tenant_id, payout_id, decide, now_us, self._encode_event, withdraw
            )
        )
        if found is None:
            raise NotFound("PAYOUT_NOT_FOUND", f"no payout {payout_id!r}", "payout_id")
        return found

    def _payout_named(self, tenant_id: str, payout_id: str, idempotency_key: str) -> str:
        """The payout a review's resolution names: by id, or by the key it
        was created with (what the reviewed decision named); exactly one."""
        check_tenant_id(tenant_id)
        if bool(payout_id) == bool(idempotency_key):
            raise InvalidArgument(
                "PAYOUT_SELECTOR_REQUIRED",
                "give payout_id or idempotency_key, exactly one",
                "payout_id",
            )
        if payout_id:
            self._check_id(payout_id, "payout_id")
            return payout_id
        self._check_id(idempotency_key, "idempotency_key")
        return payout_id_for(tenant_id, idempotency_key)

    async def approve(
        self, tenant_id: str, decision_token: str, *, payout_id: str = "", idempotency_key: str = ""
    ) -> tuple[Payout, bool]:
        """A payout held for review, approved by the decision a reviewer's
        approval issued: its token is verified against the payout's movement
        (every term, the payout's key included; spent once) and the PAYOUT
        entry posts in the transaction that moves pending_review -> approved,
        where the rail worker finds it. The same decision again: replayed;
        a payout in any other state is refused."""
        payout_id = self._payout_named(tenant_id, payout_id, idempotency_key)
        if not decision_token:
            raise InvalidArgument(
                "DECISION_TOKEN_REQUIRED",
                "an approval carries its decision token",
                "decision_token",
            )
        payout = await self.get_payout(tenant_id, payout_id)
        job = self.ledger.prepare_job(
            tenant_id, [self._payout_command(payout, decision_token)], [""]
        )
        preset = job.preset_errors.get(0)
        if preset is not None:
            # A token that is not this payout's (the first term that differs
            # named) or not the policy plane's: refused before anything is written.
            raise _request_field(preset)
        pending = payout.state == PayoutState.PENDING_REVIEW
        if pending and job.commands[0].token_expired:
            raise PermissionDenied(
                "DECISION_TOKEN_EXPIRED", "decision token has expired", "decision_token"
            )
        if pending:
            await self._open_accounts(tenant_id, payout.currency)
        claims = job.commands[0].claims
        decision_id = claims.decision_id if claims is not None else ""
        now_us = self._clock.now_us()

        def decide(current: Payout) -> tuple[Payout, Job | None, str] | None:
            if current.state != PayoutState.PENDING_REVIEW:
                if current.state != PayoutState.FAILED and current.decision_id == decision_id:
                    return None  # approved by this decision already (and maybe sent since)
                raise FailedPrecondition(
                    "PAYOUT_STATE_CONFLICT",
                    f"a {PayoutState(current.state).label} payout cannot be approved",
                    "payout_id",
                )
            updated = msgspec.structs.replace(
                current,
                state=PayoutState.APPROVED,
                decision_id=decision_id,
                updated_at_us=now_us,
            )
            return updated, job, "entry_id"

        try:
            found = await self.ledger.run_on_writer(
                lambda: rows.update_payout(
                    self._store, tenant_id, payout_id, decide, now_us, self._encode_event
                )
            )
        except TriplaneError as error:
            raise _request_field(error) from None  # e.g. the token spent on another entry
        if found is None:
            raise NotFound("PAYOUT_NOT_FOUND", f"no payout {payout_id!r}", "payout_id")
        return found

    async def decline(
        self, tenant_id: str, case_id: str, *, payout_id: str = "", idempotency_key: str = ""
    ) -> tuple[Payout, bool]:
        """A payout declined in review: pending_review -> failed with reason
        code REVIEW_DECLINED. Nothing posts: a payout pending review holds
        nothing (no entry, no expected payment). Declined again: replayed."""
        payout_id = self._payout_named(tenant_id, payout_id, idempotency_key)
        self._check_id(case_id, "case_id")
        now_us = self._clock.now_us()

        def decide(current: Payout) -> tuple[Payout, Job | None, str] | None:
            if current.state == PayoutState.FAILED and current.reason_code == REVIEW_DECLINED:
                return None
            if current.state != PayoutState.PENDING_REVIEW:
                raise FailedPrecondition(
                    "PAYOUT_STATE_CONFLICT",
                    f"a {PayoutState(current.state).label} payout cannot be declined",
                    "payout_id",
                )
            if current.case_id and current.case_id != case_id:
                raise FailedPrecondition(
                    "PAYOUT_CASE_MISMATCH", "the payout is held under another case", "case_id"
                )
            updated = msgspec.structs.replace(
                current,
                state=PayoutState.FAILED,
                updated_at_us=now_us,
                reason_code=REVIEW_DECLINED,
                reason=f"declined in review ({case_id})",
            )
            return updated, None, ""

        found = await self.ledger.run_on_writer(
            lambda: rows.update_payout(
                self._store, tenant_id, payout_id, decide, now_us, self._encode_event
            )
        )
        if found is None:
            raise NotFound("PAYOUT_NOT_FOUND", f"no payout {payout_id!r}", "payout_id")
        return found

    def _payout_command(self, payout: Payout, decision_token: str) -> Command:
        """The PAYOUT entry of an approved payout: the merchant's account
        into payouts-in-flight, under the payout's key and its decision."""
        return Command(
            tenant_id=payout.tenant_id,
            idempotency_key=payout.idempotency_key,
            kind=Kind.PAYOUT,
            debit_account_id=payout.debit_account_id,
            credit_account_id=self.in_flight_account(payout.currency),
            amount_minor=payout.amount_minor,
            currency=payout.currency,
            decision_token=decision_token,
            metadata={"payout_id": payout.payout_id, "beneficiary_id": payout.beneficiary_id},
        )

    async def reroute(
        self,
        tenant_id: str,
        payout_id: str,
        *,
        from_rail: str,
        reason_code: str,
        reason: str,
        max_attempts: int,
    ) -> tuple[Payout, bool] | None:
        """A rail failed the payout before settlement for a re-routable
        reason: it goes back to approved on its next alternate rail (the
        rail worker hands it over again), the failure kept in its attempts;
        nothing posts: its debit stays in flight under the same decision.
        (payout, True) when `from_rail` is one it already left (reported
        again); None when it cannot re-route (no alternate left, attempts
        spent, past the rails): record the outcome instead."""
        check_tenant_id(tenant_id)
        self._check_id(payout_id, "payout_id")
        self._check_id(reason_code, "reason_code")
        check_text(reason, "reason", self.ledger.config.limits)
        now_us = self._clock.now_us()

        def decide(payout: Payout) -> tuple[Payout, Job | None, str] | None:
            moved = rerouted(
                payout,
                from_rail=from_rail,
                reason_code=reason_code,
                reason=reason,
                max_attempts=max_attempts,
                now_us=now_us,
            )
            return None if moved is None else (moved, None, "")

        try:
            found = await self.ledger.run_on_writer(
                lambda: rows.update_payout(
                    self._store, tenant_id, payout_id, decide, now_us, self._encode_event
                )
            )
        except NotRerouted:
            return None
        if found is None:
            raise NotFound("PAYOUT_NOT_FOUND", f"no payout {payout_id!r}", "payout_id")
        if not found[1]:
            log.info(
                "payout %s/%s re-routed after %s failed it (%s): now %s",
                tenant_id,
                payout_id,
                from_rail,
                reason_code,
                found[0].rail,
            )
        return found

    async def submission(self, tenant_id: str, payout_id: str) -> RailSubmission:
        """What a rail needs to send the payout, its destination unsealed
        (a queued ACH / SEPA entry is built from it when its file goes)."""
        payout = await self.get_payout(tenant_id, payout_id)
        beneficiary = await self.get_beneficiary(tenant_id, payout.beneficiary_id)
        return rail_submission(payout, beneficiary, self._cipher)

    async def hand_to_rail(self, tenant_id: str, payout_id: str, rail: Rail) -> Payout:
        """Hands an approved payout to a rail and marks it submitted. A
        crash between the rail's acceptance and the mark hands it again
        with the same end_to_end_id, which the rail must take as the same
        payout. A submitted one is returned as it is."""
        payout = await self.get_payout(tenant_id, payout_id)
        if payout.state == PayoutState.SUBMITTED:
            return payout
        if payout.state != PayoutState.APPROVED:
            raise FailedPrecondition(
                "PAYOUT_STATE_CONFLICT",
                f"a {PayoutState(payout.state).label} payout cannot be submitted",
                "payout_id",
            )
        beneficiary = await self.get_beneficiary(tenant_id, payout.beneficiary_id)
        await self._ensure_recon_schema()
        reference = await rail.submit(rail_submission(payout, beneficiary, self._cipher))
        now_us = self._clock.now_us()

        def decide(current: Payout) -> tuple[Payout, Job | None, str] | None:
            if current.state != PayoutState.APPROVED:
                return None
            updated = msgspec.structs.replace(
                current,
                state=PayoutState.SUBMITTED,
                updated_at_us=now_us,
                rail_reference=reference,
            )
            return updated, None, ""

        def expect(cur: object, _before: Payout, submitted: Payout) -> None:
            self._expect(ReconTx(self._store, cur), submitted, now_us)

        found = await self.ledger.run_on_writer(
            lambda: rows.update_payout(
                self._store, tenant_id, payout_id, decide, now_us, self._encode_event, expect
            )
        )
        assert found is not None
        return found[0]

    # ---- reconciliation's expected payments ----

    async def _ensure_recon_schema(self) -> None:
        if not self._recon_ready:
            await self.ledger.run_on_writer(self._recon.create_schema)
            self._recon_ready = True

    def _expect(self, tx: ReconTx, payout: Payout, now_us: int) -> None:
        """The payout's expected payment, written in the transaction that
        marks it submitted (once: a second hand-over finds it)."""
        expected_id = expected_id_for(payout.payout_id)
        if tx.get_expected(payout.tenant_id, expected_id) is not None:
            return
        date_from, date_to = expected_window(payout.rail, now_us)
        # Found by the end-to-end id alone: an ACH trace number is not known
        # yet (entries wait in the queue for their file), and an instant
        # rail's answer is its message id, not the bank's reference.
        tx.insert_expected(
            [
                ExpectedPayment(
                    tenant_id=payout.tenant_id,
                    expected_id=expected_id,
                    ledger_account_id=self.bank_account(payout.currency),
                    direction=Direction.DEBIT,
                    currency=payout.currency,
                    amount_minor=payout.amount_minor,
                    amount_min_minor=payout.amount_minor,
                    amount_max_minor=payout.amount_minor,
                    date_from=date_from,
                    date_to=date_to,
                    end_to_end_id=payout.end_to_end_id,
                    ledger_entry_id=payout.entry_id,
                    description=f"payout {payout.payout_id}",
                    state=ExpectedState.OPEN,
                    created_at_us=now_us,
                )
            ]
        )

    def _withdraw_expected(self, tx: ReconTx, payout: Payout) -> None:
        """A payout failed or returned before the bank booked it: its
        expected payment closes (cancelled) instead of aging into a break."""
        found = tx.get_expected(payout.tenant_id, expected_id_for(payout.payout_id))
        if found is not None and found.state in _WITHDRAWABLE:
            tx.set_expected_states(
                payout.tenant_id, [(found.expected_id, ExpectedState.CANCELLED, "")]
            )


def _request_field(error: TriplaneError) -> TriplaneError:
    """The ledger's error naming the request's field (`decision_token...`,
    not `.decision_token...`: the command sits at the request's root)."""
    error.field = error.field.removeprefix(".")
    return error


class Settlement(msgspec.Struct, frozen=True):
    """One settled period of a merchant (the row its claim wrote)."""

    tenant_id: str
    account_id: str
    period: str
    # settled, or below_minimum (nothing posted; the balance waits).
    state: str
    gross_minor: int
    fee_minor: int
    reserve_minor: int
    net_minor: int
    currency: str
    entry_id: str
    closes_at_us: int
    settled_at_us: int


_encode = msgspec.msgpack.encode
_decode_schedule = msgspec.msgpack.Decoder(Schedule).decode
_decode_settlement = msgspec.msgpack.Decoder(Settlement).decode


class Settlements:
    """Merchants' settlement schedules and the sweeper any replica may run:
    a period settles once whoever runs it (settle_period's claim)."""

    def __init__(self, ledger: Ledger, sweep_batch: int = 500) -> None:
        self.ledger = ledger
        self._store = ledger.store
        self._clock = ledger.clock
        self._batch = sweep_batch

    async def put_schedule(self, schedule: Schedule) -> Schedule:
        check_tenant_id(schedule.tenant_id)
        limits = self.ledger.config.limits
        for name in ("account_id", "merchant_id", "payable_account_id"):
            check_id(getattr(schedule, name), f"schedule.{name}", limits)
        check_schedule(schedule)
        await self.ledger.get_account(schedule.tenant_id, schedule.account_id)
        await self.ledger.get_account(schedule.tenant_id, schedule.payable_account_id)
        now_us = self._clock.now_us()
        await self.ledger.run_on_writer(
            lambda: rows.put_schedule(self._store, schedule, _encode(schedule), now_us)
        )
        return schedule

    async def settlements(self, tenant_id: str, account_id: str) -> list[Settlement]:
        found = await self.ledger.run_on_writer(
            lambda: rows.list_settlements(self._store, tenant_id, account_id)
        )
        return [_decode_settlement(body) for body in found if body]

    async def settle_due(self) -> int:
        """Settles every schedule's latest closed period not settled yet;
        returns how many periods this call settled (or found below the
        minimum)."""
        done = 0
        after = ("", "")
        while True:
            page = await self.ledger.run_on_writer(
                functools.partial(rows.list_schedules, self._store, after, self._batch)
            )
            for body in page:
                schedule = _decode_schedule(body)
                try:
                    done += await self.settle(schedule)
                except TriplaneError as error:
                    # Refused (the balance moved under it): tried next sweep.
                    log.warning(
                        "settlement of %s/%s refused: %s",
                        schedule.tenant_id,
                        schedule.account_id,
                        error.reason,
                    )
            if len(page) < self._batch:
                return done
            last = _decode_schedule(page[-1])
            after = (last.tenant_id, scoped_key(last.tenant_id, last.account_id))

    async def settle(self, schedule: Schedule) -> int:
        """The schedule's latest closed period, once: 1 if this call settled
        it, 0 if it was settled already (here or on another replica)."""
        now_us = self._clock.now_us()
        period = latest_closed_period(schedule, now_us)
        if period is None:
            return 0
        tenant = schedule.tenant_id
        key = f"{scoped_key(tenant, schedule.account_id)}/{period.key}"
        store = self._store
        if await self.ledger.run_on_writer(lambda: rows.settlement_claimed(store, tenant, key)):
            return 0
        account = await self.ledger.get_account(tenant, schedule.account_id)
        available = account.credits_posted - account.debits_posted - account.debits_pending
        gross = available
        if schedule.frequency != Frequency.INSTANT:
            # What had arrived by the cut-off; later money waits for the next period.
            debits, credits = await self.ledger.run_on_writer(
                lambda: store.posted_as_of(tenant, schedule.account_id, period.closes_at_us)
            )
            gross = min(available, credits - debits)
        if gross <= 0:
            return 0  # nothing to settle: no row, the next sweep looks again
        netting = net(schedule, gross)
        below = netting.net_minor <= 0 or netting.net_minor < schedule.min_payout_minor
        job = None if below else self._job(schedule, period, netting, account.currency, now_us)

        def body(entry_id: str) -> bytes:
            return _encode(
                Settlement(
                    tenant_id=tenant,
                    account_id=schedule.account_id,
                    period=period.key,
                    state="below_minimum" if below else "settled",
                    gross_minor=netting.gross_minor,
                    fee_minor=netting.fee_minor,
                    reserve_minor=netting.reserve_minor,
                    net_minor=netting.net_minor,
                    currency=account.currency,
                    entry_id=entry_id,
                    closes_at_us=period.closes_at_us,
                    settled_at_us=now_us,
                )
            )

        state = "below_minimum" if below else "settled"
        claimed = await self.ledger.run_on_writer(
            lambda: rows.settle_period(store, tenant, key, period.key, state, job, body, now_us)
        )
        return 1 if claimed else 0

    def _job(
        self, schedule: Schedule, period: Period, netting: Netting, currency: str, now_us: int
    ) -> Job:
        legs = []
        if netting.fee_minor:
            legs.append(
                Leg(
                    account_id=schedule.fee_account_id,
                    kind=LegKind.FIXED,
                    amount_minor=netting.fee_minor,
                    basis_points=0,
                    label="settlement_fee",
                    release_at_us=0,
                    release_account_id="",
                )
            )
        if netting.reserve_minor:
            legs.append(
                Leg(
                    account_id=schedule.reserve_account_id,
                    kind=LegKind.FIXED,
                    amount_minor=netting.reserve_minor,
                    basis_points=0,
                    label="rolling_reserve",
                    release_at_us=now_us + schedule.reserve_days * DAY_US,
                    release_account_id=schedule.payable_account_id,
                )
            )
        command = Command(
            tenant_id=schedule.tenant_id,
            idempotency_key=f"settle:{schedule.account_id}:{period.key}",
            kind=Kind.SETTLEMENT,
            debit_account_id=schedule.account_id,
            credit_account_id=schedule.payable_account_id,
            amount_minor=netting.gross_minor,
            currency=currency,
            splits=legs,
            metadata={"period": period.key, "merchant_id": schedule.merchant_id},
        )
        return Job(tenant_id=schedule.tenant_id, commands=[command], fields=["schedule"])
