"""The one tenant-id rule: what the money plane always accepted, and safe as a
token of a NATS subject."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triplane.runtime.bus import subject_for
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.ids import (
    TENANT_ID_MAX_LENGTH,
    TENANT_ID_PATTERN,
    check_tenant_id,
    is_tenant_id,
)


@pytest.mark.parametrize("tenant_id", ["acme", "a", "0", "t-1_x", "a" * TENANT_ID_MAX_LENGTH])
def test_money_plane_tenant_ids_are_accepted(tenant_id: str) -> None:
    check_tenant_id(tenant_id)


@pytest.mark.parametrize(
    "tenant_id",
    [
        "Upper.Case:x",  # the policy plane used to accept it
        "Acme",
        "a.b",
        "a*",
        "a>",
        "a b",
        "a\tb",
        "acme\n",  # `$` alone would let it through
        "-a",
        "_a",
        "a:b",
        "a/b",
        "a" * (TENANT_ID_MAX_LENGTH + 1),
    ],
)
def test_other_tenant_ids_are_refused_naming_the_field(tenant_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_tenant_id(tenant_id, "payment.tenant_id")
    assert (caught.value.reason, caught.value.field) == ("INVALID_TENANT_ID", "payment.tenant_id")


def test_an_empty_tenant_id_is_required() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_tenant_id("")
    assert (caught.value.reason, caught.value.field) == ("FIELD_REQUIRED", "tenant_id")


@given(st.from_regex(TENANT_ID_PATTERN, fullmatch=True))
def test_an_accepted_tenant_id_is_one_plain_subject_token(tenant_id: str) -> None:
    check_tenant_id(tenant_id)
    tokens = subject_for("money.entry.posted", tenant_id).split(".")
    assert tokens == ["triplane", "money", tenant_id, "entry", "posted"]


@given(
    st.text(max_size=20), st.sampled_from([".", "*", ">", " ", "\t", "\n"]), st.text(max_size=20)
)
def test_a_subject_separator_or_wildcard_is_never_accepted(
    before: str, special: str, after: str
) -> None:
    assert not is_tenant_id(before + special + after)
