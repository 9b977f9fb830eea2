"""Stateless domain rules: split rounding and input validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from money_helpers import bps_leg, fixed_leg

from money_plane.domain import (
    BASIS_POINTS_TOTAL,
    AccountSpec,
    Command,
    Kind,
    Leg,
    check_account_spec,
    check_command,
    check_tenant_id,
    split_amounts,
)
from triplane.runtime.config import load_config
from triplane.runtime.currencies import INT64_MAX
from triplane.runtime.errors import InvalidArgument, OutOfRange, TriplaneError

CONFIG = load_config(environ={})
LIMITS = CONFIG.money.limits
MAX_HOLD_S = CONFIG.money.holds.max_timeout_s

amounts = st.integers(min_value=1, max_value=INT64_MAX // BASIS_POINTS_TOTAL)
legs = st.lists(
    st.one_of(
        st.integers(1, BASIS_POINTS_TOTAL).map(lambda bps: bps_leg("fee", bps)),
        st.integers(1, 10_000).map(lambda amount: fixed_leg("tax", amount)),
    ),
    max_size=6,
)


@given(total=amounts, split_legs=legs)
def test_split_rounds_basis_points_down_and_fixed_legs_exactly(
    total: int, split_legs: list[Leg]
) -> None:
    parts = split_amounts(total, split_legs)
    assert len(parts) == len(split_legs)
    for leg, part in zip(split_legs, parts, strict=True):
        if leg.basis_points:
            # Floor: never more than the exact share, less by under one unit.
            exact_times_total = total * leg.basis_points
            assert part * BASIS_POINTS_TOTAL <= exact_times_total
            assert (part + 1) * BASIS_POINTS_TOTAL > exact_times_total
        else:
            assert part == leg.amount_minor


@given(total=amounts, basis_points=st.lists(st.integers(1, 2_500), min_size=1, max_size=4))
def test_split_residue_stays_with_the_remainder(total: int, basis_points: list[int]) -> None:
    """Legs totalling at most 100% leave a non-negative remainder that is the
    exact residue: legs + remainder == total, to the unit."""
    parts = split_amounts(total, [bps_leg("fee", bps) for bps in basis_points])
    remainder = total - sum(parts)
    assert remainder >= 0
    assert sum(parts) + remainder == total
    exact_remainder = total * (BASIS_POINTS_TOTAL - sum(basis_points))
    # The remainder gets its exact share plus every leg's rounding residue.
    assert remainder * BASIS_POINTS_TOTAL >= exact_remainder
    assert remainder * BASIS_POINTS_TOTAL < exact_remainder + len(parts) * BASIS_POINTS_TOTAL


def test_split_example_fee_and_tax() -> None:
    # 2.9% of 1001 is 29.029 -> 29; the residue (0.029) stays with the remainder.
    assert split_amounts(1001, [bps_leg("fee", 290), fixed_leg("tax", 50)]) == [29, 50]


def _transfer(**fields: object) -> Command:
    base: dict[str, object] = dict(
        tenant_id="acme",
        idempotency_key="k1",
        kind=Kind.TRANSFER,
        debit_account_id="a",
        credit_account_id="b",
        amount_minor=100,
        currency="USD",
    )
    base.update(fields)
    return Command(**base)  # type: ignore[arg-type]


BAD_COMMANDS: list[tuple[str, Command, type[TriplaneError], str, str]] = [
    (
        "no key",
        _transfer(idempotency_key=""),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.idempotency_key",
    ),
    (
        "long key",
        _transfer(idempotency_key="k" * 65),
        InvalidArgument,
        "STRING_TOO_LONG",
        "t.idempotency_key",
    ),
    (
        "bad key",
        _transfer(idempotency_key="a b"),
        InvalidArgument,
        "INVALID_ID",
        "t.idempotency_key",
    ),
    ("no kind", _transfer(kind=0), InvalidArgument, "FIELD_REQUIRED", "t.kind"),
    (
        "internal kind",
        _transfer(kind=Kind.RESERVE_RELEASE),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.kind",
    ),
    (
        "no debit",
        _transfer(debit_account_id=""),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.debit_account_id",
    ),
    (
        "no credit",
        _transfer(credit_account_id=""),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.credit_account_id",
    ),
    (
        "same account",
        _transfer(credit_account_id="a"),
        InvalidArgument,
        "SAME_ACCOUNT",
        "t.credit_account_id",
    ),
    ("no currency", _transfer(currency=""), InvalidArgument, "FIELD_REQUIRED", "t.amount.currency"),
    (
        "unknown currency",
        _transfer(currency="XXZ"),
        InvalidArgument,
        "UNKNOWN_CURRENCY",
        "t.amount.currency",
    ),
    (
        "lowercase currency",
        _transfer(currency="usd"),
        InvalidArgument,
        "UNKNOWN_CURRENCY",
        "t.amount.currency",
    ),
    (
        "zero",
        _transfer(amount_minor=0),
        InvalidArgument,
        "AMOUNT_NOT_POSITIVE",
        "t.amount.amount_minor",
    ),
    (
        "negative",
        _transfer(amount_minor=-5),
        InvalidArgument,
        "AMOUNT_NOT_POSITIVE",
        "t.amount.amount_minor",
    ),
    (
        "beyond int64",
        _transfer(amount_minor=INT64_MAX + 1),
        OutOfRange,
        "AMOUNT_TOO_LARGE",
        "t.amount.amount_minor",
    ),
    (
        "hold id on transfer",
        _transfer(hold_id="h1"),
        InvalidArgument,
        "FIELD_NOT_ALLOWED",
        "t.hold_id",
    ),
    (
        "timeout on transfer",
        _transfer(hold_timeout_s=5),
        InvalidArgument,
        "FIELD_NOT_ALLOWED",
        "t.hold_timeout_s",
    ),
    (
        "long description",
        _transfer(description="d" * 257),
        InvalidArgument,
        "STRING_TOO_LONG",
        "t.description",
    ),
    (
        "too much metadata",
        _transfer(metadata={str(i): "v" for i in range(33)}),
        InvalidArgument,
        "TOO_MANY_METADATA_ENTRIES",
        "t.metadata",
    ),
    (
        "long metadata value",
        _transfer(metadata={"k": "v" * 257}),
        InvalidArgument,
        "STRING_TOO_LONG",
        "t.metadata[k]",
    ),
    (
        "negative timeout",
        _transfer(kind=Kind.AUTHORIZE, hold_timeout_s=-1),
        InvalidArgument,
        "HOLD_TIMEOUT_OUT_OF_RANGE",
        "t.hold_timeout_s",
    ),
    (
        "timeout too long",
        _transfer(kind=Kind.AUTHORIZE, hold_timeout_s=MAX_HOLD_S + 1),
        InvalidArgument,
        "HOLD_TIMEOUT_OUT_OF_RANGE",
        "t.hold_timeout_s",
    ),
    (
        "splits on authorize",
        _transfer(kind=Kind.AUTHORIZE, splits=[bps_leg("f", 10)]),
        InvalidArgument,
        "SPLITS_NOT_ALLOWED",
        "t.splits",
    ),
    (
        "capture without hold",
        Command(tenant_id="acme", idempotency_key="k", kind=Kind.CAPTURE),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.hold_id",
    ),
    (
        "capture with accounts",
        Command(
            tenant_id="acme",
            idempotency_key="k",
            kind=Kind.CAPTURE,
            hold_id="h",
            debit_account_id="a",
        ),
        InvalidArgument,
        "FIELD_NOT_ALLOWED",
        "t.debit_account_id",
    ),
    (
        "capture negative",
        Command(
            tenant_id="acme",
            idempotency_key="k",
            kind=Kind.CAPTURE,
            hold_id="h",
            amount_minor=-1,
            currency="USD",
        ),
        InvalidArgument,
        "AMOUNT_NOT_POSITIVE",
        "t.amount.amount_minor",
    ),
    (
        "void with amount",
        Command(
            tenant_id="acme",
            idempotency_key="k",
            kind=Kind.VOID,
            hold_id="h",
            amount_minor=5,
            currency="USD",
        ),
        InvalidArgument,
        "FIELD_NOT_ALLOWED",
        "t.amount",
    ),
    (
        "refund without entry",
        Command(tenant_id="acme", idempotency_key="k", kind=Kind.REFUND),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.entry_id",
    ),
    (
        "refund with splits",
        Command(
            tenant_id="acme",
            idempotency_key="k",
            kind=Kind.REFUND,
            entry_id="e",
            splits=[bps_leg("f", 10)],
        ),
        InvalidArgument,
        "SPLITS_NOT_ALLOWED",
        "t.splits",
    ),
    (
        "too many splits",
        _transfer(splits=[bps_leg("f", 1)] * 17),
        InvalidArgument,
        "TOO_MANY_SPLITS",
        "t.splits",
    ),
    (
        "bps zero",
        _transfer(splits=[bps_leg("f", 0)]),
        InvalidArgument,
        "INVALID_BASIS_POINTS",
        "t.splits[0].basis_points",
    ),
    (
        "bps above 100%",
        _transfer(splits=[fixed_leg("g", 1), bps_leg("f", 10_001)]),
        InvalidArgument,
        "INVALID_BASIS_POINTS",
        "t.splits[1].basis_points",
    ),
    (
        "fixed leg zero",
        _transfer(splits=[fixed_leg("f", 0)]),
        InvalidArgument,
        "AMOUNT_NOT_POSITIVE",
        "t.splits[0].amount_minor",
    ),
    (
        "leg without kind",
        _transfer(
            splits=[
                Leg(
                    account_id="f",
                    kind=0,
                    amount_minor=1,
                    basis_points=0,
                    label="",
                    release_at_us=0,
                    release_account_id="",
                )
            ]
        ),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.splits[0].kind",
    ),
    (
        "leg without account",
        _transfer(splits=[fixed_leg("", 1)]),
        InvalidArgument,
        "FIELD_REQUIRED",
        "t.splits[0].account_id",
    ),
    (
        "reserve without release account",
        _transfer(splits=[bps_leg("r", 100, release_at_us=5)]),
        InvalidArgument,
        "INCOMPLETE_RESERVE",
        "t.splits[0].release_account_id",
    ),
    (
        "splits above amount",
        _transfer(splits=[fixed_leg("f", 60), fixed_leg("g", 41)]),
        InvalidArgument,
        "SPLITS_EXCEED_AMOUNT",
        "t.splits",
    ),
]


@pytest.mark.parametrize(
    ("command", "error", "reason", "field"),
    [case[1:] for case in BAD_COMMANDS],
    ids=[case[0] for case in BAD_COMMANDS],
)
def test_validation_names_the_field(
    command: Command, error: type[TriplaneError], reason: str, field: str
) -> None:
    with pytest.raises(error) as caught:
        check_command(command, "t", LIMITS, MAX_HOLD_S)
    assert (caught.value.reason, caught.value.field) == (reason, field)


def test_valid_commands_pass() -> None:
    check_command(_transfer(), "t", LIMITS, MAX_HOLD_S)
    check_command(
        _transfer(kind=Kind.AUTHORIZE, hold_timeout_s=MAX_HOLD_S), "t", LIMITS, MAX_HOLD_S
    )
    check_command(
        _transfer(splits=[fixed_leg("f", 60), fixed_leg("g", 40)]), "t", LIMITS, MAX_HOLD_S
    )
    check_command(
        Command(tenant_id="acme", idempotency_key="k", kind=Kind.CAPTURE, hold_id="h"),
        "t",
        LIMITS,
        MAX_HOLD_S,
    )


@pytest.mark.parametrize(
    ("tenant_id", "reason"),
    [
        ("", "FIELD_REQUIRED"),
        ("Acme", "INVALID_TENANT_ID"),
        ("a/b", "INVALID_TENANT_ID"),
        ("a" * 64, "INVALID_TENANT_ID"),
        ("-a", "INVALID_TENANT_ID"),
    ],
)
def test_tenant_id_rules(tenant_id: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_tenant_id(tenant_id)
    assert (caught.value.reason, caught.value.field) == (reason, "tenant_id")


@pytest.mark.parametrize(
    ("changes", "reason", "field"),
    [
        ({"account_id": ""}, "FIELD_REQUIRED", "a[0].account_id"),
        ({"account_id": "x" * 65}, "STRING_TOO_LONG", "a[0].account_id"),
        ({"currency": "ZZZ"}, "UNKNOWN_CURRENCY", "a[0].currency"),
        ({"kind": 0}, "FIELD_REQUIRED", "a[0].kind"),
        ({"constraint": 0}, "FIELD_REQUIRED", "a[0].constraint"),
        (
            {"constraint": 2, "overdraft_limit_minor": -1},
            "NEGATIVE_OVERDRAFT_LIMIT",
            "a[0].overdraft_limit_minor",
        ),
        (
            {"constraint": 1, "overdraft_limit_minor": 10},
            "OVERDRAFT_WITHOUT_CONSTRAINT",
            "a[0].overdraft_limit_minor",
        ),
    ],
)
def test_account_spec_rules(changes: dict[str, object], reason: str, field: str) -> None:
    base: dict[str, object] = dict(
        account_id="acc", currency="EUR", kind=1, constraint=1, overdraft_limit_minor=0, metadata={}
    )
    base.update(changes)
    with pytest.raises(InvalidArgument) as caught:
        check_account_spec(AccountSpec(**base), "a[0]", LIMITS)  # type: ignore[arg-type]
    assert (caught.value.reason, caught.value.field) == (reason, field)
