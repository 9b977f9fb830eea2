"""Payouts: beneficiaries, payout states and what a payout hands a rail.

Nothing here does I/O. A beneficiary's destination is validated by the bank
formats library (money_plane/formats/beneficiary.py); what is personal data
(the account number or IBAN, the holder's name) is sealed (AES-256-GCM,
triplane.runtime.secret_files.FieldCipher) before it is stored, and the
rest of Triplane sees only the gateway's tokens and a masked form
(architecture rule 4).

A payout's life (README "Payouts and settlement"):

    pending_review --(its case approved: a new decision, ApprovePayout)--> approved
    pending_review --(its case declined: DeclinePayout)--> failed (REVIEW_DECLINED)
    approved --(handed to a rail)--> submitted --> settled --> returned
        |  ^                            |------> returned
        |  |--(re-routable failure, an alternate rail left: `reroute`)
        |------------------------------ +------> failed

Each arrow that moves money posts one ledger entry under a key derived from
the payout (`payout-settle:<id>`, `payout-reverse:<id>`), in the transaction
that moves the state, so a rail reporting an outcome twice posts it once.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

import msgspec
from msgspec import Struct

from money_plane.formats import beneficiary as formats
from money_plane.formats._common import require
from triplane.runtime.errors import FailedPrecondition, InvalidArgument
from triplane.runtime.secret_files import FieldCipher


class PayoutState(enum.IntEnum):
    PENDING_REVIEW = 1
    APPROVED = 2
    SUBMITTED = 3
    SETTLED = 4
    RETURNED = 5
    FAILED = 6

    @property
    def label(self) -> str:
        return self.name.lower()


class PayoutOutcome(enum.IntEnum):
    SETTLED = 1
    RETURNED = 2
    FAILED = 3


# Payouts that count for velocity and for "has this beneficiary been paid".
LIVE_STATES = (
    PayoutState.PENDING_REVIEW,
    PayoutState.APPROVED,
    PayoutState.SUBMITTED,
    PayoutState.SETTLED,
)


class Beneficiary(Struct, frozen=True):
    tenant_id: str
    beneficiary_id: str
    merchant_id: str
    country: str
    kind: str  # iban | us_bank | card | wallet
    masked: str
    bic: str
    routing_number: str
    account_type: str
    account_token: str
    holder_name_token: str
    # Sealed (enc:v1:...): the IBAN, the US account number or the vault token;
    # the holder's name.
    sealed_account: str
    sealed_holder_name: str
    created_at_us: int
    # What the request said, as a keyed hash per field (idempotent retries).
    fingerprint: list[tuple[str, str]] = []


class PayoutAttempt(Struct, frozen=True):
    """A rail the payout failed on before settlement, and was re-routed from."""

    rail: str
    reason_code: str
    reason: str
    failed_at_us: int


class Payout(Struct, frozen=True):
    tenant_id: str
    payout_id: str
    idempotency_key: str
    beneficiary_id: str
    merchant_id: str
    debit_account_id: str
    amount_minor: int
    currency: str
    state: int
    decision_id: str
    case_id: str
    rail: str
    end_to_end_id: str
    created_at_us: int
    updated_at_us: int
    description: str = ""
    entry_id: str = ""
    settlement_entry_id: str = ""
    reversal_entry_id: str = ""
    reason_code: str = ""
    reason: str = ""
    rail_reference: str = ""
    # The decision's other eligible rails, next first (its route's
    # alternates), and the rails it failed on before `rail`.
    alternate_rails: list[str] = []
    attempts: list[PayoutAttempt] = []

    def fingerprint(self) -> list[tuple[str, object]]:
        """What an idempotent retry of CreatePayout must repeat."""
        return [
            ("beneficiary_id", self.beneficiary_id),
            ("merchant_id", self.merchant_id),
            ("debit_account_id", self.debit_account_id),
            ("amount.amount_minor", self.amount_minor),
            ("amount.currency", self.currency),
            ("description", self.description),
        ]


@dataclass(frozen=True, slots=True)
class NewBeneficiary:
    beneficiary_id: str
    merchant_id: str
    holder_name: str
    country: str
    kind: str  # iban | us_bank | token
    iban: str = ""
    bic: str = ""
    routing_number: str = ""
    account_number: str = ""
    account_type: str = ""
    token_kind: str = ""
    token: str = ""
    account_token: str = ""
    holder_name_token: str = ""


def payout_id_for(tenant_id: str, idempotency_key: str) -> str:
    """A payout's id follows from its key: a retry finds the same row."""
    digest = hashlib.sha256(f"{tenant_id}\x1f{idempotency_key}".encode()).hexdigest()
    return f"po_{digest[:24]}"


def end_to_end_id_for(payout_id: str) -> str:
    """The ISO 20022 EndToEndId (at most 35 characters, [A-Za-z0-9]):
    unique per payout, the same on every resubmission of it."""
    return "TP" + payout_id.removeprefix("po_").upper()


def _sealing_context(tenant_id: str, beneficiary_id: str, field: str) -> str:
    return f"triplane.money.beneficiary|{tenant_id}|{beneficiary_id}|{field}"


def build_beneficiary(
    tenant_id: str, new: NewBeneficiary, cipher: FieldCipher, now_us: int
) -> Beneficiary:
    """Validates the destination (the field named on refusal) and seals what
    is personal data."""
    prefix = "beneficiary"
    require(new.holder_name, f"{prefix}.holder_name")
    if not new.account_token or not new.holder_name_token:
        # The gateway tokenizes before it forwards: a request without the
        # tokens did not come through it.
        raise InvalidArgument(
            "FIELD_REQUIRED", "the gateway's tokens are required", f"{prefix}.account_token"
        )
    clear_account: str
    bic = routing = account_type = ""
    if new.kind == "iban":
        iban = formats.iban_account(new.iban, new.bic, field=prefix)
        kind, masked, clear_account, bic = "iban", iban.masked, iban.iban, iban.bic
    elif new.kind == "us_bank":
        account = formats.us_bank_account(
            new.routing_number,
            new.account_number,
            new.account_type or formats.AccountType.CHECKING,
            field=prefix,
        )
        kind, masked, clear_account = "us_bank", account.masked, account.account_number
        routing, account_type = account.routing_number, str(account.account_type)
    elif new.kind == "token":
        dest = formats.token_destination(new.token_kind, new.token, field=prefix)
        kind, masked, clear_account = str(dest.kind), f"…{dest.token[-4:]}", dest.token
    else:
        raise InvalidArgument(
            "DESTINATION_REQUIRED",
            "one destination is required: iban, us_bank or token",
            f"{prefix}.destination",
        )
    return Beneficiary(
        tenant_id=tenant_id,
        beneficiary_id=new.beneficiary_id,
        merchant_id=new.merchant_id,
        country=new.country,
        kind=kind,
        masked=masked,
        bic=bic,
        routing_number=routing,
        account_type=account_type,
        account_token=new.account_token,
        holder_name_token=new.holder_name_token,
        sealed_account=cipher.seal(
            clear_account, _sealing_context(tenant_id, new.beneficiary_id, "account")
        ),
        sealed_holder_name=cipher.seal(
            new.holder_name, _sealing_context(tenant_id, new.beneficiary_id, "holder_name")
        ),
        created_at_us=now_us,
        fingerprint=[
            ("merchant_id", new.merchant_id),
            ("country", new.country),
            ("kind", kind),
            ("bic", bic),
            ("routing_number", routing),
            ("account_token", new.account_token),
            ("holder_name_token", new.holder_name_token),
        ],
    )


def holder_name_of(beneficiary: Beneficiary, cipher: FieldCipher) -> str:
    return cipher.open(
        beneficiary.sealed_holder_name,
        _sealing_context(beneficiary.tenant_id, beneficiary.beneficiary_id, "holder_name"),
    )


def account_of(beneficiary: Beneficiary, cipher: FieldCipher) -> str:
    return cipher.open(
        beneficiary.sealed_account,
        _sealing_context(beneficiary.tenant_id, beneficiary.beneficiary_id, "account"),
    )


# ---- the rail interface (the rails themselves are issue 14 §2) ----


@dataclass(frozen=True, slots=True)
class RailSubmission:
    """Everything a rail adapter needs to send one payout, and nothing more.
    The destination is in clear: a rail adapter runs inside the money plane's
    trust boundary and must not log or persist it."""

    tenant_id: str
    payout_id: str
    # The ISO 20022 EndToEndId / NACHA trace reference, the same on every
    # resubmission: a rail must treat a second submission with the same id
    # as the first (the money plane may resubmit after a crash).
    end_to_end_id: str
    rail: str  # the policy's routing choice: instant_payment, bank_transfer, ...
    amount_minor: int
    currency: str
    beneficiary_kind: str  # iban | us_bank | card | wallet
    holder_name: str
    country: str
    iban: str = ""
    bic: str = ""
    routing_number: str = ""
    account_number: str = ""
    account_type: str = ""
    token: str = ""
    description: str = ""


class Rail(Protocol):
    """A rail adapter: accepts a submission (raising when it cannot); its
    outcome comes back later through Payouts.record_outcome
    (RecordPayoutOutcome)."""

    def submit(self, submission: RailSubmission) -> Awaitable[str]:
        """Returns the rail's reference for the submission."""
        ...


def rail_submission(
    payout: Payout, beneficiary: Beneficiary, cipher: FieldCipher
) -> RailSubmission:
    account = account_of(beneficiary, cipher)
    by_kind: dict[str, str] = {}
    if beneficiary.kind == "iban":
        by_kind = {"iban": account, "bic": beneficiary.bic}
    elif beneficiary.kind == "us_bank":
        by_kind = {
            "routing_number": beneficiary.routing_number,
            "account_number": account,
            "account_type": beneficiary.account_type,
        }
    else:
        by_kind = {"token": account}
    return RailSubmission(
        tenant_id=payout.tenant_id,
        payout_id=payout.payout_id,
        end_to_end_id=payout.end_to_end_id,
        rail=payout.rail,
        amount_minor=payout.amount_minor,
        currency=payout.currency,
        beneficiary_kind=beneficiary.kind,
        holder_name=holder_name_of(beneficiary, cipher),
        country=beneficiary.country,
        description=payout.description,
        **by_kind,
    )


# ---- outcomes ----


@dataclass(frozen=True, slots=True)
class Transition:
    """What an outcome does to a payout in a given state."""

    target: PayoutState
    # The ledger movement, as (debit, credit) roles: "in_flight", "bank",
    # "merchant"; None when nothing moves (a replay).
    debit: str | None
    credit: str | None
    replay: bool = False


_OUTCOME_TARGET = {
    PayoutOutcome.SETTLED: PayoutState.SETTLED,
    PayoutOutcome.RETURNED: PayoutState.RETURNED,
    PayoutOutcome.FAILED: PayoutState.FAILED,
}


# Rail names (the policy's rail routes) the adapters serve under another name.
ADAPTER_OF_RAIL = {"ach_same_day": "ach"}


def adapter_of(rail: str) -> str:
    """The adapter a routed rail name is sent by (a method name: itself)."""
    return ADAPTER_OF_RAIL.get(rail, rail)


class NotRerouted(Exception):
    """The failure cannot re-route this payout: recorded as an outcome."""


def rerouted(
    payout: Payout,
    *,
    from_rail: str,
    reason_code: str,
    reason: str,
    max_attempts: int,
    now_us: int,
) -> Payout | None:
    """The payout moved to its next alternate rail (approved again: its
    debit stays in flight, its decision covers the same amount and
    accounts), the failed rail in its attempts; None when `from_rail` is a
    rail it already left (an earlier attempt's failure reported again).
    NotRerouted when the failure must be recorded as it is: no alternate
    left, attempts spent, or a state past the rails."""
    state = PayoutState(payout.state)
    if (
        from_rail
        and adapter_of(payout.rail) != from_rail
        and any(adapter_of(a.rail) == from_rail for a in payout.attempts)
    ):
        return None
    if state not in (PayoutState.APPROVED, PayoutState.SUBMITTED):
        raise NotRerouted(f"a {state.label} payout is past its rails")
    # Another name for a rail already tried (same-day and next-day ACH are
    # one adapter) would be sent as the same payment again: skipped.
    tried = {adapter_of(payout.rail), *(adapter_of(a.rail) for a in payout.attempts)}
    left = [r for r in payout.alternate_rails if adapter_of(r) not in tried]
    if not left or len(payout.attempts) + 1 >= max_attempts:
        raise NotRerouted("no alternate rail left")
    attempt = PayoutAttempt(payout.rail, reason_code, reason, now_us)
    return msgspec.structs.replace(
        payout,
        state=PayoutState.APPROVED,
        rail=left[0],
        alternate_rails=[r for r in left[1:] if adapter_of(r) != adapter_of(left[0])],
        attempts=[*payout.attempts, attempt],
        updated_at_us=now_us,
        rail_reference="",
    )


def transition(state: PayoutState, outcome: PayoutOutcome) -> Transition:
    """The move an outcome makes from `state`; FAILED_PRECONDITION
    PAYOUT_STATE_CONFLICT (naming `outcome`) when it cannot happen."""
    target = _OUTCOME_TARGET[outcome]
    if state == target:
        return Transition(target, None, None, replay=True)
    in_flight = (PayoutState.APPROVED, PayoutState.SUBMITTED)
    if outcome == PayoutOutcome.SETTLED and state in in_flight:
        return Transition(target, "in_flight", "bank")
    if outcome in (PayoutOutcome.RETURNED, PayoutOutcome.FAILED) and state in in_flight:
        return Transition(target, "in_flight", "merchant")
    if outcome == PayoutOutcome.RETURNED and state == PayoutState.SETTLED:
        return Transition(target, "bank", "merchant")
    raise FailedPrecondition(
        "PAYOUT_STATE_CONFLICT",
        f"a {state.label} payout cannot become {target.label}",
        "outcome",
    )
