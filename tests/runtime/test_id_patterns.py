"""Identifier checks match the whole value: a pattern anchored with `$` and
applied with `match()` lets a trailing newline through, which then reaches
NATS subjects, log lines and database keys."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway import validate as gateway_validate
from money_plane import domain as money_domain
from policy_plane import validate as policy_validate
from triplane.runtime.config import load_config
from triplane.runtime.errors import InvalidArgument

CONFIG = load_config()
CHECKS: dict[str, Callable[[str, str], None]] = {
    "money account id": lambda v, f: money_domain.check_id(v, f, CONFIG.money.limits),
    "policy id": lambda v, f: policy_validate.check_id(v, f, CONFIG.policy.limits),
    "gateway id": lambda v, f: gateway_validate.check_id(v, f, CONFIG.gateway.limits),
    "policy country": policy_validate.check_country,
    "gateway country": gateway_validate.check_country,
}
GOOD = {"policy country": "FR", "gateway country": "FR"}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_a_trailing_newline_is_refused_naming_the_field(name: str) -> None:
    check = CHECKS[name]
    good = GOOD.get(name, "acct_1")
    check(good, "some.field")  # the value itself is accepted
    with pytest.raises(InvalidArgument) as raised:
        check(good + "\n", "some.field")
    assert raised.value.field == "some.field"


def test_mcc_with_a_trailing_newline_is_refused() -> None:
    gateway_validate.check_mcc("5411", "merchant_category")
    with pytest.raises(InvalidArgument) as raised:
        gateway_validate.check_mcc("5411\n", "merchant_category")
    assert raised.value.reason == "MERCHANT_CATEGORY_INVALID"
