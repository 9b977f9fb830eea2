"""The shared PII recogniser: what it must catch, however it is written, and
the look-alikes it must let through."""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triplane.runtime import pii
from triplane.runtime.errors import InvalidArgument

PAN = "4111111111111111"
# One number, written every way a person or a form might.
PAN_SPELLINGS = [
    "4111111111111111",
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111.1111.1111.1111",
    "4111 - 1111 - 1111 - 1111",
    "4111\u20131111\u20131111\u20131111",  # en dashes
    "4111\u00a01111\u00a01111\u00a01111",  # no-break spaces
    "4111\u200b1111\u200b1111\u200b1111",  # zero-width spaces
    # Full-width, Arabic-Indic and Devanagari digits.
    " ".join(["\uff14\uff11\uff11\uff11"] + ["\uff11" * 4] * 3),
    "\u0664" + "\u0661" * 15,
    " ".join(["\u096a\u0967\u0967\u0967"] + ["\u0967" * 4] * 3),
]
OTHER_PANS = ["5500 0000 0000 0004", "3782 822463 10005", "6011111111111117", "2223000048400011"]

PHONE = "+14155552671"
# Region US: the national spellings count; the international ones anywhere.
PHONE_SPELLINGS = [
    "+1 415 555 2671",
    "+1-415-555-2671",
    "+1 (415) 555-2671",
    "+14155552671",
    "(415) 555-2671",
    "415-555-2671",
    "415.555.2671",
    "415 555 2671",
    "4155552671",
    "1-415-555-2671",
    "\uff0b\uff11 \uff14\uff11\uff15 \uff15\uff15\uff15 \uff12\uff16\uff17\uff11",  # full width
]

# What free text holds that is not a phone number (region US and GB alike):
# dates, times, timestamps, amounts, identifiers, versions, addresses.
PHONE_LOOKALIKES = [
    "2026-01-15",
    "15/01/2026",
    "01/15/2026",
    "15.01.2026",
    "2026.01.15",
    "20260115",
    "12:30:45",
    "12:30:45.123456",
    "2026-01-15T12:30:45Z",
    "2026-01-15T12:30:45.123+02:00",
    "2026-01-15 12:30:45",
    "1767225600",
    "1767225600123",
    "1767225600123456",
    "1767225600123456789",
    "1767225600.123456",
    "1,234,567.89",
    "$12,345.00",
    "1 234 567,89 EUR",
    "USD 4,155,552.67",
    "amount_minor=123456789",
    "ORD-2026-000123",
    "ref 2026-000123",
    "INV/2026/0042",
    "order #123456789",
    "192.168.100.200",
    "10.0.19045.3803",
    "lat 37.774929 lon -122.419416",
    "123e4567-e89b-12d3-a456-426614174000",
    "tracking 1Z999AA10123456784",
    "step 3 of 12",
]

IBAN = "DE89370400440532013000"
IBAN_SPELLINGS = [
    "DE89370400440532013000",
    "DE89 3704 0044 0532 0130 00",
    "de89 3704 0044 0532 0130 00",
    "DE89-3704-0044-0532-0130-00",
]
OTHER_IBANS = [
    "GB82 WEST 1234 5698 7654 32",
    "FR14 2004 1010 0505 0001 3M02 606",
    "NL91ABNA0417164300",
]


def _kinds(text: str, region: str | None = "US") -> list[tuple[str, str]]:
    return [(f.kind, f.canonical) for f in pii.scan(text, region).found]


def _luhn_complete(body: str) -> str:
    for check in "0123456789":
        if pii.luhn_valid(body + check):
            return body + check
    raise AssertionError("a Luhn check digit always exists")


# ---------------------------------------------------------------- cards


@given(
    st.sampled_from("23456"),
    st.text(alphabet="0123456789", min_size=11, max_size=17),
    st.sampled_from([" ", "-", ".", ""]),
)
def test_every_luhn_valid_card_number_is_found_inside_text_and_one_digit_off_is_not(
    first: str, body: str, separator: str
) -> None:
    pan = _luhn_complete(first + body)
    written = separator.join(pan[i : i + 4] for i in range(0, len(pan), 4))
    assert _kinds(f"paid with {written} today", None) == [(pii.PAN, pan)]
    wrong = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    assert pii.PAN not in [kind for kind, _ in _kinds(f"paid with {wrong} today", None)]


@pytest.mark.parametrize("written", PAN_SPELLINGS)
def test_a_card_number_is_one_card_number_however_it_is_written(written: str) -> None:
    assert _kinds(f"my card: {written}, thanks", None) == [(pii.PAN, PAN)]
    assert pii.find_pii(written) == pii.PAN


@pytest.mark.parametrize("written", OTHER_PANS)
def test_other_networks_are_found(written: str) -> None:
    assert _kinds(written, None) == [(pii.PAN, written.replace(" ", ""))]


def test_a_card_number_followed_by_its_expiry_or_another_number_is_still_found() -> None:
    assert _kinds("4111 1111 1111 1111 2027", None) == [(pii.PAN, PAN)]
    assert _kinds("card 4111111111111111 exp 12/27 cvv 123", None) == [(pii.PAN, PAN)]


@pytest.mark.parametrize(
    "value",
    [
        "1767225600123",  # ms since the epoch (13 digits)
        "1767225600123456",  # us (16)
        "1767225600123456789",  # ns (19)
        "12345678901234567890123",  # a long reference, no card inside
    ],
)
def test_timestamps_and_long_references_are_not_card_numbers(value: str) -> None:
    assert _kinds(f"at {value}", None) == []


# ---------------------------------------------------------------- IBANs and e-mails


@pytest.mark.parametrize("written", IBAN_SPELLINGS)
def test_an_iban_with_or_without_spaces_is_found(written: str) -> None:
    assert _kinds(f"pay to {written} please", None) == [(pii.IBAN, IBAN)]


@pytest.mark.parametrize("written", OTHER_IBANS)
def test_ibans_of_other_countries_are_found(written: str) -> None:
    assert _kinds(written, None) == [(pii.IBAN, written.replace(" ", "").upper())]


def test_an_iban_with_a_wrong_check_digit_is_not_one() -> None:
    assert _kinds("DE88 3704 0044 0532 0130 00", None) == []


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("ada@example.com", "ada@example.com"),
        ("Ada.Lovelace+bills@Example.CO.UK", "ada.lovelace+bills@example.co.uk"),
        ("jos\u00e9@ex\u00e4mple.de", "jos\u00e9@ex\u00e4mple.de"),
        ("ada\uff20example.com", "ada@example.com"),  # full-width @
    ],
)
def test_emails_are_found_lower_cased(written: str, canonical: str) -> None:
    assert _kinds(f"write to <{written}>.", None) == [(pii.EMAIL, canonical)]


# ---------------------------------------------------------------- phones


@pytest.mark.parametrize("written", PHONE_SPELLINGS)
def test_a_phone_number_is_one_e164_number_however_it_is_written(written: str) -> None:
    assert _kinds(f"call me on {written} after six", "US") == [(pii.PHONE, PHONE)]


def test_numbers_in_international_form_are_found_without_a_region() -> None:
    assert _kinds("call +44 20 7946 0958 or +33 6 12 34 56 78", None) == [
        (pii.PHONE, "+442079460958"),
        (pii.PHONE, "+33612345678"),
    ]
    # National forms need the region that reads them.
    assert _kinds("call 020 7946 0958", None) == []
    assert _kinds("call 020 7946 0958", "GB") == [(pii.PHONE, "+442079460958")]


@pytest.mark.parametrize("region", ["US", "GB", None])
@pytest.mark.parametrize("text", PHONE_LOOKALIKES)
def test_dates_times_timestamps_amounts_and_ids_are_not_phone_numbers(
    text: str, region: str | None
) -> None:
    assert _kinds(f"note: {text} done", region) == []


# ---------------------------------------------------------------- the identifier rule


@pytest.mark.parametrize(
    "value",
    [
        "tok_pan_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
        "acct-000123",
        "order 2026-11-23",
        "12345",
        "merchant_42",
        "4155552671",  # a bare national number cannot be told from an account number
        "123e4567-e89b-12d3-a456-426614174000",
        "",
    ],
)
def test_tokens_and_identifiers_are_not_pii(value: str) -> None:
    assert pii.find_pii(value) == ""


def test_random_uuids_are_never_card_numbers() -> None:
    """About 1 in 800 uuid4 hex strings holds a Luhn-valid run of a card's
    length between two letters (5c6940174981481a...): it was refused as
    PII_IN_IDENTIFIER, one idempotency key in some 800."""
    assert pii.find_pii("5c6940174981481a8dd43a4ba0ae5174") == ""
    assert pii.find_pii("5c694017-4981-481a-8dd4-3a4ba0ae5174") == ""
    rng = random.Random(20261206)
    for _ in range(20_000):
        value = uuid.UUID(int=rng.getrandbits(128), version=4)
        assert pii.find_pii(value.hex) == "", value.hex
        assert pii.find_pii(str(value)) == "", str(value)
    # A longer span glued to a letter gives way to the card inside it (the
    # 17 digits 4111...1111 3 are Luhn-valid and touch the A).
    assert _kinds("paid 4111111111111111 3A", None) == [(pii.PAN, "4111111111111111")]
    # Set off by a separator or a space, a card number is still one.
    assert pii.find_pii("acct_4111111111111111") == pii.PAN
    assert _kinds("card 4111111111111111 ok", None) == [(pii.PAN, "4111111111111111")]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("4111111111111111", pii.PAN),
        ("cust-4111111111111111", pii.PAN),
        ("ada@example.com", pii.EMAIL),
        ("+14155552671", pii.PHONE),
        ("DE89370400440532013000", pii.IBAN),
    ],
)
def test_an_identifier_that_is_or_holds_pii_is_found(value: str, kind: str) -> None:
    assert pii.find_pii(value) == kind


def test_refusal_names_the_field_and_never_echoes_the_value() -> None:
    with pytest.raises(InvalidArgument) as caught:
        pii.refuse_pii({"device_id": "dev-1", "note": "card 4111111111111111"})
    err = caught.value
    assert (err.reason, err.field, err.metadata["pii_kind"]) == ("RAW_PII_REFUSED", "note", "pan")
    assert "4111" not in err.message


def test_a_text_without_digits_or_at_signs_is_returned_as_it_is() -> None:
    text = "loan_application: documents"
    scanned = pii.scan(text, "US")
    assert scanned.text is text and scanned.found == ()
