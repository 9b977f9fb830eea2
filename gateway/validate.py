"""Input checks of the public API: the right status, a reason, the field named,
and nothing changed (every check runs before the first downstream call)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from triplane.common.v1 import types_pb2
from triplane.runtime import codec as wire
from triplane.runtime import pii
from triplane.runtime.config import GatewayLimitsConfig
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.ids import check_tenant_id

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")
COUNTRY_PATTERN = re.compile(r"^[A-Z]{2}$")
MCC_PATTERN = re.compile(r"^[0-9]{4}$")
PARTNER_KIND_PATTERN = re.compile(r"^[a-z0-9_]{1,64}$")


def require_tenant_id(value: str, field: str = "tenant_id") -> None:
    """The runtime's one tenant-id rule (the planes apply the same), so a
    tenant the gateway accepts is never refused by the plane it calls."""
    check_tenant_id(value, field)


def require_id(value: str, field: str, limits: GatewayLimitsConfig) -> None:
    if not value:
        raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
    check_id(value, field, limits)


def check_id(value: str, field: str, limits: GatewayLimitsConfig) -> None:
    if not value:
        return
    if len(value) > limits.max_id_length:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"{field} is longer than {limits.max_id_length} characters", field
        )
    check_no_pii(value, field)
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            "ID_INVALID", f"{field} may only hold letters, digits and _ . : -", field
        )


def check_no_pii(value: str, field: str) -> None:
    """An identifier is forwarded, logged and stored as it is, so one that is
    or holds a card number, an IBAN, an e-mail address or a phone number in
    international form is refused (INVALID_ARGUMENT PII_IN_IDENTIFIER, the
    field named, the value never echoed): the rule the planes apply too
    (triplane.runtime.pii.find_pii), so they never refuse what passed here.
    A bare national number (4155552671) cannot be told from a numeric
    account id and passes."""
    kind = pii.find_pii(value)
    if kind:
        raise InvalidArgument(
            "PII_IN_IDENTIFIER",
            f"{field} is or holds a {pii.SPOKEN[kind]}; identifiers must not carry personal "
            "data (send a token, or put it in the field made for it)",
            field,
            {"pii_kind": kind},
        )


def check_string(value: str, field: str, limits: GatewayLimitsConfig) -> None:
    if len(value) > limits.max_string_length:
        raise InvalidArgument(
            "FIELD_TOO_LONG",
            f"{field} is longer than {limits.max_string_length} characters",
            field,
        )


def check_country(value: str, field: str) -> None:
    if value and not COUNTRY_PATTERN.fullmatch(value):
        raise InvalidArgument("COUNTRY_INVALID", f"{field} must be ISO 3166-1 alpha-2", field)


def check_mcc(value: str, field: str) -> None:
    if value and not MCC_PATTERN.fullmatch(value):
        raise InvalidArgument("MERCHANT_CATEGORY_INVALID", f"{field} must be 4 digits", field)


def check_money(
    money: types_pb2.Money, field: str, limits: GatewayLimitsConfig, required: bool
) -> None:
    """The runtime's one money rule (known currency, positive amount), with
    the gateway's own bound on the amount (gateway.limits.max_amount_minor)."""
    wire.amount(money, field, required=required, max_minor=limits.max_amount_minor)


def check_attributes(
    attributes: Mapping[str, str], field: str, limits: GatewayLimitsConfig
) -> None:
    if len(attributes) > limits.max_attributes:
        raise InvalidArgument(
            "TOO_MANY_ATTRIBUTES", f"{field} holds more than {limits.max_attributes}", field
        )
    for name, value in attributes.items():
        check_id(name, f"{field}[{name}]", limits)
        check_string(value, f"{field}[{name}]", limits)


def check_features(features: Mapping[str, float], field: str, limits: GatewayLimitsConfig) -> None:
    if len(features) > limits.max_features:
        raise InvalidArgument(
            "TOO_MANY_FEATURES", f"{field} holds more than {limits.max_features}", field
        )
    for name, value in features.items():
        check_id(name, f"{field}[{name}]", limits)
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidArgument(
                "FEATURE_NOT_FINITE", f"{field}[{name}] must be finite", f"{field}[{name}]"
            )
