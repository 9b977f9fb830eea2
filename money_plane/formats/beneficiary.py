"""Beneficiary destinations, validated before anything is written for a rail.

- `IbanAccount`: IBAN (ISO 13616: country structure and mod-97 check digits)
  and an optional BIC (ISO 9362), both by `schwifty`.
- `UsBankAccount`: ABA routing transit number (checksum by
  `stdnum.us.rtn`, and a Federal Reserve prefix: 00-12, 21-32, 61-72, 80)
  and a DFI account number (1-17 letters/digits/hyphens, the NACHA field).
- `TokenDestination`: a card or wallet payout destination as an opaque token
  issued by a vault; a raw card number or IBAN is refused as one.

Refusals are `InvalidArgument` naming the field (`<prefix>.iban`, ...) and a
reason (`IBAN_INVALID`, `BIC_INVALID`, `ROUTING_NUMBER_INVALID`,
`ACCOUNT_NUMBER_INVALID`, `TOKEN_INVALID`, `PII_IN_IDENTIFIER`,
`FIELD_REQUIRED`), with `metadata["detail"]` saying which rule failed. The
value itself is never echoed: account numbers are personal data.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from schwifty import BIC, IBAN
from schwifty import exceptions as schwifty_errors
from stdnum import exceptions as stdnum_errors
from stdnum.us import rtn

from money_plane.formats._common import refuse, require
from triplane.runtime import pii

_DETAIL = {
    schwifty_errors.InvalidChecksumDigits: "checksum",
    schwifty_errors.InvalidLength: "length",
    schwifty_errors.InvalidStructure: "structure",
    schwifty_errors.InvalidCountryCode: "country",
    schwifty_errors.InvalidBankCode: "bank_code",
    schwifty_errors.InvalidBranchCode: "branch_code",
    schwifty_errors.InvalidAccountCode: "account_code",
    schwifty_errors.InvalidBBANChecksum: "bban_checksum",
}
_ACCOUNT_NUMBER = re.compile(r"^[0-9A-Za-z-]{1,17}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")
_RTN_PREFIXES = {f"{n:02d}" for n in (*range(13), *range(21, 33), *range(61, 73), 80)}


class AccountType(enum.StrEnum):
    CHECKING = "checking"
    SAVINGS = "savings"


class TokenKind(enum.StrEnum):
    CARD = "card"
    WALLET = "wallet"


@dataclass(frozen=True, slots=True)
class IbanAccount:
    iban: str  # compact, upper case
    bic: str  # 8 or 11 characters, "" when not given
    country: str  # the IBAN's country

    @property
    def masked(self) -> str:
        return f"{self.iban[:4]}…{self.iban[-4:]}"


@dataclass(frozen=True, slots=True)
class UsBankAccount:
    routing_number: str  # 9 digits
    account_number: str
    account_type: AccountType = AccountType.CHECKING

    @property
    def masked(self) -> str:
        return f"{self.routing_number}/…{self.account_number[-4:]}"


@dataclass(frozen=True, slots=True)
class TokenDestination:
    kind: TokenKind
    token: str


Destination = IbanAccount | UsBankAccount | TokenDestination


def _detail(exc: Exception) -> str:
    for cls, name in _DETAIL.items():
        if isinstance(exc, cls):
            return name
    return "format"


def _field(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate_bic(bic: str, field: str = "bic") -> str:
    """A BIC (8 or 11 characters), normalized to upper case."""
    require(bic, field)
    try:
        parsed = BIC(bic.strip())
    except schwifty_errors.SchwiftyException as exc:
        raise refuse(
            "BIC_INVALID", f"{field} is not a valid BIC", field, detail=_detail(exc)
        ) from exc
    return str(parsed.compact)


def iban_account(iban: str, bic: str = "", *, field: str = "beneficiary") -> IbanAccount:
    """An IBAN account; the BIC is optional (SEPA needs none inside the EEA)."""
    iban_field = _field(field, "iban")
    require(iban, iban_field)
    try:
        parsed = IBAN(iban)
    except schwifty_errors.SchwiftyException as exc:
        raise refuse(
            "IBAN_INVALID", f"{iban_field} is not a valid IBAN", iban_field, detail=_detail(exc)
        ) from exc
    checked_bic = validate_bic(bic, _field(field, "bic")) if bic else ""
    return IbanAccount(iban=str(parsed.compact), bic=checked_bic, country=parsed.country_code)


def validate_routing_number(value: str, field: str = "routing_number") -> str:
    require(value, field)
    try:
        number = str(rtn.validate(value))
    except stdnum_errors.InvalidChecksum as exc:
        raise refuse(
            "ROUTING_NUMBER_INVALID",
            f"{field} fails the ABA check digit",
            field,
            detail="checksum",
        ) from exc
    except stdnum_errors.ValidationError as exc:
        raise refuse(
            "ROUTING_NUMBER_INVALID", f"{field} must be 9 digits", field, detail="format"
        ) from exc
    if number[:2] not in _RTN_PREFIXES:
        raise refuse(
            "ROUTING_NUMBER_INVALID",
            f"{field} does not start with a Federal Reserve routing symbol",
            field,
            detail="prefix",
        )
    return number


def us_bank_account(
    routing_number: str,
    account_number: str,
    account_type: str = AccountType.CHECKING,
    *,
    field: str = "beneficiary",
) -> UsBankAccount:
    routing = validate_routing_number(routing_number, _field(field, "routing_number"))
    account_field = _field(field, "account_number")
    require(account_number, account_field)
    compact = account_number.strip()
    if not _ACCOUNT_NUMBER.fullmatch(compact) or not any(c.isdigit() for c in compact):
        raise refuse(
            "ACCOUNT_NUMBER_INVALID",
            f"{account_field} must be 1 to 17 letters, digits or hyphens (the NACHA DFI "
            "account number field)",
            account_field,
            detail="format",
        )
    try:
        kind = AccountType(account_type)
    except ValueError as exc:
        type_field = _field(field, "account_type")
        raise refuse(
            "ACCOUNT_TYPE_INVALID", f"{type_field} must be checking or savings", type_field
        ) from exc
    return UsBankAccount(routing_number=routing, account_number=compact, account_type=kind)


def token_destination(kind: str, token: str, *, field: str = "beneficiary") -> TokenDestination:
    """A card or wallet destination held as a vault token, never in clear."""
    kind_field, token_field = _field(field, "kind"), _field(field, "token")
    try:
        checked_kind = TokenKind(kind)
    except ValueError as exc:
        raise refuse(
            "DESTINATION_KIND_INVALID", f"{kind_field} must be card or wallet", kind_field
        ) from exc
    require(token, token_field)
    found = pii.find_pii(token)
    if found:
        raise refuse(
            "PII_IN_IDENTIFIER",
            f"{token_field} is or holds a {pii.SPOKEN[found]}; send the vault's token",
            token_field,
            pii_kind=found,
        )
    if not _TOKEN.fullmatch(token):
        raise refuse(
            "TOKEN_INVALID",
            f"{token_field} must be 8 to 128 letters, digits or _ . : -",
            token_field,
        )
    return TokenDestination(kind=checked_kind, token=token)
