"""The one wire vocabulary (triplane.runtime.codec): times, money, page sizes
and page tokens round-trip, and what a caller may get wrong is refused with
one reason naming the field."""

from __future__ import annotations

import base64

import msgspec
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2
from triplane.runtime import codec
from triplane.runtime.currencies import INT64_MAX
from triplane.runtime.errors import Code, InvalidArgument, OutOfRange, TriplaneError

MIN_US = codec.MIN_TIMESTAMP_SECONDS * 1_000_000
MAX_US = codec.MAX_TIMESTAMP_SECONDS * 1_000_000 + 999_999


def refusal(error: pytest.ExceptionInfo[TriplaneError]) -> tuple[Code, str, str]:
    return error.value.code, error.value.reason, error.value.field


# ---------------------------------------------------------------- times


@given(st.integers(min_value=MIN_US, max_value=MAX_US))
def test_every_time_in_range_round_trips(us: int) -> None:
    stamp = codec.timestamp(us)
    assert codec.micros(stamp, "at") == us
    # The protobuf library reads our Timestamp as the same instant.
    assert stamp.ToMicroseconds() == us
    filled = timestamp_pb2.Timestamp()
    codec.fill_timestamp(filled, us)
    assert filled == stamp


@given(
    st.integers(min_value=codec.MIN_TIMESTAMP_SECONDS, max_value=codec.MAX_TIMESTAMP_SECONDS),
    st.integers(min_value=0, max_value=999_999_999),
)
def test_a_valid_timestamp_reads_as_protobuf_reads_it(seconds: int, nanos: int) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert codec.micros(stamp, "at") == stamp.ToMicroseconds()


@given(
    st.one_of(
        st.tuples(
            st.integers(min_value=-(2**63), max_value=codec.MIN_TIMESTAMP_SECONDS - 1),
            st.integers(min_value=0, max_value=999_999_999),
        ),
        st.tuples(
            st.integers(min_value=codec.MAX_TIMESTAMP_SECONDS + 1, max_value=2**63 - 1),
            st.integers(min_value=0, max_value=999_999_999),
        ),
        st.tuples(
            st.integers(min_value=0, max_value=10**9),
            st.one_of(
                st.integers(min_value=-(2**31), max_value=-1),
                st.integers(min_value=1_000_000_000, max_value=2**31 - 1),
            ),
        ),
    )
)
def test_an_out_of_range_timestamp_is_refused_naming_the_field(pair: tuple[int, int]) -> None:
    seconds, nanos = pair
    with pytest.raises(InvalidArgument) as caught:
        codec.micros(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "splits[2].release_at")
    assert refusal(caught) == (Code.INVALID_ARGUMENT, "INVALID_TIMESTAMP", "splits[2].release_at")


def test_unset_is_zero_both_ways() -> None:
    # An absent field and the zero Timestamp read the same: 0, "unset".
    request = money_pb2.GetBalanceRequest()
    assert not request.HasField("as_of")
    assert codec.micros(request.as_of, "as_of") == 0
    assert codec.timestamp(0) == timestamp_pb2.Timestamp()
    assert codec.micros(timestamp_pb2.Timestamp(nanos=999), "as_of") == 0


def test_a_time_of_ours_outside_the_range_is_a_bug_not_a_wire_value() -> None:
    with pytest.raises(ValueError):
        codec.timestamp(MAX_US + 1)
    with pytest.raises(ValueError):
        codec.fill_timestamp(timestamp_pb2.Timestamp(), MIN_US - 1)


# ---------------------------------------------------------------- money


@given(
    st.integers(min_value=1, max_value=INT64_MAX),
    st.sampled_from(["USD", "EUR", "JPY", "KWD", "BRL"]),
)
def test_money_round_trips(amount_minor: int, currency: str) -> None:
    assert codec.amount(codec.money(amount_minor, currency), "amount") == (amount_minor, currency)


@pytest.mark.parametrize(
    ("money", "expected"),
    [
        (types_pb2.Money(), (Code.INVALID_ARGUMENT, "FIELD_REQUIRED", "payment.amount")),
        (
            types_pb2.Money(amount_minor=5),
            (Code.INVALID_ARGUMENT, "FIELD_REQUIRED", "payment.amount.currency"),
        ),
        (
            types_pb2.Money(amount_minor=5, currency="XQQ"),
            (Code.INVALID_ARGUMENT, "UNKNOWN_CURRENCY", "payment.amount.currency"),
        ),
        (
            types_pb2.Money(amount_minor=5, currency="usd"),
            (Code.INVALID_ARGUMENT, "UNKNOWN_CURRENCY", "payment.amount.currency"),
        ),
        (
            types_pb2.Money(amount_minor=0, currency="USD"),
            (Code.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE", "payment.amount.amount_minor"),
        ),
        (
            types_pb2.Money(amount_minor=-1, currency="USD"),
            (Code.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE", "payment.amount.amount_minor"),
        ),
        (
            types_pb2.Money(amount_minor=1_000_001, currency="USD"),
            (Code.OUT_OF_RANGE, "AMOUNT_TOO_LARGE", "payment.amount.amount_minor"),
        ),
    ],
)
def test_money_refusals_name_the_field(
    money: types_pb2.Money, expected: tuple[Code, str, str]
) -> None:
    with pytest.raises(TriplaneError) as caught:
        codec.amount(money, "payment.amount", max_minor=1_000_000)
    assert refusal(caught) == expected


def test_an_optional_money_may_be_unset_but_not_half_set() -> None:
    assert codec.amount(types_pb2.Money(), "value", required=False) == (0, "")
    with pytest.raises(InvalidArgument) as caught:
        codec.amount(types_pb2.Money(currency="USD"), "value", required=False)
    assert refusal(caught) == (Code.INVALID_ARGUMENT, "AMOUNT_NOT_POSITIVE", "value.amount_minor")


def test_the_amount_bound_is_int64_unless_a_plane_bounds_it_lower() -> None:
    assert codec.amount(codec.money(INT64_MAX, "USD"), "amount") == (INT64_MAX, "USD")
    with pytest.raises(OutOfRange):
        codec.check_amount(INT64_MAX + 1, "amount")


# ---------------------------------------------------------------- page sizes


def test_page_size_zero_is_the_default_and_the_maximum_caps() -> None:
    assert codec.page_size(0, 50, 500) == 50
    assert codec.page_size(1, 50, 500) == 1
    assert codec.page_size(500, 50, 500) == 500
    assert codec.page_size(501, 50, 500) == 500
    assert codec.page_size(2**31 - 1, 50, 500) == 500


def test_a_negative_page_size_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        codec.page_size(-1, 50, 500)
    assert refusal(caught) == (Code.INVALID_ARGUMENT, "PAGE_SIZE_INVALID", "page_size")


# ---------------------------------------------------------------- page tokens

KINDS = st.sampled_from(["money.postings", "policy.offers", "policy.cases", "gateway.dead_letters"])
POSITION_ELEMENT = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(max_size=32)
)


def shape_of(position: list[int | str]) -> list[type[int] | type[str]]:
    return [int if isinstance(value, int) else str for value in position]


def expect_refused(token: str, kind: str, shape: list[type[int] | type[str]]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        codec.decode_page_token(token, kind, shape)
    assert refusal(caught) == (Code.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID", "page_token")


@given(KINDS, st.lists(POSITION_ELEMENT, min_size=1, max_size=3))
def test_a_token_resumes_where_its_list_left_off(kind: str, position: list[int | str]) -> None:
    token = codec.encode_page_token(kind, position)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert codec.decode_page_token(token, kind, shape_of(position)) == tuple(position)


@given(KINDS, KINDS, st.lists(POSITION_ELEMENT, min_size=1, max_size=3))
def test_a_token_of_another_list_is_refused(
    issued_by: str, presented_to: str, position: list[int | str]
) -> None:
    token = codec.encode_page_token(issued_by, position)
    if issued_by == presented_to:
        assert codec.decode_page_token(token, presented_to, shape_of(position)) is not None
    else:
        expect_refused(token, presented_to, shape_of(position))


@given(st.text(min_size=1, max_size=200))
def test_garbage_is_refused_never_crashes(token: str) -> None:
    try:
        position = codec.decode_page_token(token, "money.postings", [int])
    except InvalidArgument as refused:
        assert (refused.reason, refused.field) == ("PAGE_TOKEN_INVALID", "page_token")
    else:
        # Only text that is one of our tokens passes: it re-encodes to itself.
        assert position is not None
        assert codec.encode_page_token("money.postings", position) == token


def _raw(body: object) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(body)).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        "!!",
        "not-a-token",
        # The formats of earlier releases: money's p1:<sequence>, the AI plane's
        # v1:<offset>, the policy plane's raw offset, the gateway's time:id.
        base64.urlsafe_b64encode(b"p1:42").decode(),
        base64.urlsafe_b64encode(b"v1:42").decode(),
        base64.urlsafe_b64encode(b"42").decode(),
        _raw({"v": 2, "k": "money.postings", "p": [42]}),
        _raw({"v": 1, "k": "money.postings", "p": ["42"]}),
        _raw({"v": 1, "k": "money.postings", "p": [True]}),
        _raw({"v": 1, "k": "money.postings", "p": [4.2]}),
        _raw({"v": 1, "k": "money.postings", "p": [42, 43]}),
        _raw({"v": 1, "k": "money.postings", "p": []}),
        _raw({"v": 1, "k": "money.postings", "p": [42], "x": 1}),
        _raw({"v": 1, "k": "money.postings"}),
        _raw([1, "money.postings", [42]]),
        _raw({"v": 1, "k": "money.postings", "p": [42]}) + "A" * codec.MAX_PAGE_TOKEN_CHARS,
    ],
)
def test_garbled_old_and_foreign_tokens_are_refused(token: str) -> None:
    expect_refused(token, "money.postings", [int])


def test_an_empty_token_is_the_first_page() -> None:
    assert codec.decode_page_token("", "money.postings", [int]) is None


def test_padding_is_optional() -> None:
    token = codec.encode_page_token("money.postings", [7])
    padded = token + "=" * (-len(token) % 4)
    assert codec.decode_page_token(padded, "money.postings", [int]) == (7,)


def test_an_offset_token_never_names_a_negative_offset() -> None:
    assert codec.decode_page_offset("", "policy.bundles") == 0
    assert (
        codec.decode_page_offset(codec.encode_page_token("policy.bundles", (50,)), "policy.bundles")
        == 50
    )
    with pytest.raises(InvalidArgument) as caught:
        codec.decode_page_offset(codec.encode_page_token("policy.bundles", (-1,)), "policy.bundles")
    assert refusal(caught) == (Code.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID", "page_token")
