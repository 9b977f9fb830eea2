"""Beneficiary validation: each failure names the field and a reason, and
never echoes the account data."""

from __future__ import annotations

from formats_samples import refused

from money_plane.formats.beneficiary import (
    AccountType,
    TokenKind,
    iban_account,
    token_destination,
    us_bank_account,
    validate_bic,
    validate_routing_number,
)


def test_iban_and_bic_normalized() -> None:
    account = iban_account("de89 3704 0044 0532 0130 00", "cobadeffxxx")
    assert account.iban == "DE89370400440532013000"
    assert account.bic == "COBADEFFXXX"
    assert account.country == "DE"
    assert account.masked == "DE89…3000"


def test_iban_without_bic_is_allowed() -> None:
    assert iban_account("FR1420041010050500013M02606").bic == ""


def test_iban_bad_checksum_names_field_and_detail() -> None:
    with refused("IBAN_INVALID", "payee.iban") as r:
        iban_account("DE89370400440532013001", field="payee")
    assert r.error is not None
    assert r.error.metadata["detail"] == "checksum"
    assert "0532013001" not in r.error.message


def test_iban_wrong_length_and_unknown_country() -> None:
    with refused("IBAN_INVALID", "beneficiary.iban") as r:
        iban_account("DE8937040044053201300")
    assert r.error is not None and r.error.metadata["detail"] == "length"
    with refused("IBAN_INVALID", "beneficiary.iban"):
        iban_account("XX89370400440532013000")


def test_iban_required() -> None:
    with refused("FIELD_REQUIRED", "beneficiary.iban"):
        iban_account("")


def test_bic_invalid_names_bic_field() -> None:
    with refused("BIC_INVALID", "beneficiary.bic"):
        iban_account("DE89370400440532013000", "COBADE")
    with refused("BIC_INVALID", "bic"):
        validate_bic("COBA12FFXXX")  # no country in positions 5-6
    assert validate_bic("COBADEFF") == "COBADEFF"


def test_us_account_valid() -> None:
    account = us_bank_account("021000021", "000123456789", "savings")
    assert account.routing_number == "021000021"
    assert account.account_type is AccountType.SAVINGS
    assert account.masked.endswith("6789")


def test_routing_number_checksum_format_and_prefix() -> None:
    with refused("ROUTING_NUMBER_INVALID", "beneficiary.routing_number") as r:
        us_bank_account("021000022", "12345")
    assert r.error is not None and r.error.metadata["detail"] == "checksum"
    with refused("ROUTING_NUMBER_INVALID") as r:
        validate_routing_number("02100002")
    assert r.error is not None and r.error.metadata["detail"] == "format"
    # 9 digits with a valid ABA check digit but a prefix the Fed never issues.
    with refused("ROUTING_NUMBER_INVALID") as r:
        validate_routing_number("500000005")
    assert r.error is not None and r.error.metadata["detail"] == "prefix"


def test_account_number_rules() -> None:
    with refused("ACCOUNT_NUMBER_INVALID", "beneficiary.account_number"):
        us_bank_account("021000021", "123456789012345678")  # 18 > 17
    with refused("ACCOUNT_NUMBER_INVALID", "beneficiary.account_number"):
        us_bank_account("021000021", "12 34")
    with refused("ACCOUNT_NUMBER_INVALID", "beneficiary.account_number"):
        us_bank_account("021000021", "ABC-DEF")  # no digit at all
    with refused("FIELD_REQUIRED", "beneficiary.account_number"):
        us_bank_account("021000021", "")
    with refused("ACCOUNT_TYPE_INVALID", "beneficiary.account_type"):
        us_bank_account("021000021", "12345", "money_market")


def test_token_destinations() -> None:
    card = token_destination("card", "tok_card_8f2a91c4")
    assert card.kind is TokenKind.CARD
    assert token_destination("wallet", "wal:2026:abcdef").token == "wal:2026:abcdef"
    with refused("PII_IN_IDENTIFIER", "beneficiary.token") as r:
        token_destination("card", "4111111111111111")
    assert r.error is not None and "4111" not in r.error.message
    with refused("TOKEN_INVALID", "beneficiary.token"):
        token_destination("wallet", "short")
    with refused("TOKEN_INVALID", "beneficiary.token"):
        token_destination("wallet", "has spaces in it")
    with refused("DESTINATION_KIND_INVALID", "beneficiary.kind"):
        token_destination("crypto", "tok_12345678")
