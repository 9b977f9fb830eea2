"""The shared PII recogniser: what it must catch and what it must let through."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triplane.runtime import pii
from triplane.runtime.errors import InvalidArgument

VALID_PANS = ["4111111111111111", "4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"]


def _luhn_complete(body: str) -> str:
    for check in "0123456789":
        if pii.luhn_valid(body + check):
            return body + check
    raise AssertionError("a Luhn check digit always exists")


@given(st.text(alphabet="0123456789", min_size=12, max_size=18))
def test_every_luhn_completed_number_is_a_pan_and_one_digit_off_is_not(body: str) -> None:
    pan = _luhn_complete(body)
    assert pii.classify(pan) == pii.PAN
    assert pii.find_pii(f"paid with {pan} today") == pii.PAN
    wrong = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    assert pii.classify(wrong) != pii.PAN


@pytest.mark.parametrize("value", VALID_PANS)
def test_card_numbers_with_separators_are_pans(value: str) -> None:
    assert pii.classify(value) == pii.PAN
    assert pii.find_pii(value) == pii.PAN


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("ada@example.com", pii.EMAIL),
        ("+44 20 7946 0958", pii.PHONE),
        ("(212) 555-0101", pii.PHONE),
    ],
)
def test_emails_and_phones_are_recognised(value: str, kind: str) -> None:
    assert pii.classify(value) == kind
    assert pii.find_pii(f"contact: {value}") == kind


@pytest.mark.parametrize(
    "value",
    ["tok_pan_1f3a9c0e", "acct-000123", "order 2026-11-23", "12345", "merchant_42", ""],
)
def test_tokens_and_identifiers_are_not_pii(value: str) -> None:
    assert pii.classify(value) == ""
    assert pii.find_pii(value) == ""


def test_refusal_names_the_field_and_never_echoes_the_value() -> None:
    with pytest.raises(InvalidArgument) as caught:
        pii.refuse_pii({"device_id": "dev-1", "note": "card 4111111111111111"})
    err = caught.value
    assert (err.reason, err.field, err.metadata["pii_kind"]) == ("RAW_PII_REFUSED", "note", "pan")
    assert "4111" not in err.message
