"""Identifiers every plane reads the same way.

A tenant id is checked by one rule in every plane (money, policy, AI and the
gateway), so a tenant one plane accepts is never refused by the next hop. It is
the rule the money plane has always applied: lower-case letters, digits, `_`
and `-`, starting with a letter or digit, at most 63 characters. It has to be
this narrow because a tenant id is a token of NATS subjects
(`triplane.money.<tenant>.entry.posted`), where `.` separates tokens, `*` and
`>` are wildcards and white space ends the subject; it also names key
prefixes in Redis and Aerospike and rows in every store. The bound is part of
the rule rather than a config key: a bound tuned per plane would let the planes
disagree again.
"""

from __future__ import annotations

import re

from triplane.runtime.errors import InvalidArgument

TENANT_ID_MAX_LENGTH = 63
TENANT_ID_RULE = f"[a-z0-9][a-z0-9_-]{{0,{TENANT_ID_MAX_LENGTH - 1}}}"
# Matched whole (fullmatch): `^...$` with match() would let a trailing newline in.
TENANT_ID_PATTERN = re.compile(TENANT_ID_RULE)
# The one reason every plane gives for a malformed tenant id.
TENANT_ID_INVALID = "INVALID_TENANT_ID"


def is_tenant_id(value: str) -> bool:
    return TENANT_ID_PATTERN.fullmatch(value) is not None


def check_tenant_id(value: str, field: str = "tenant_id") -> None:
    """Raises InvalidArgument naming `field` unless `value` is a tenant id:
    FIELD_REQUIRED when empty, INVALID_TENANT_ID when malformed."""
    if not value:
        raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
    if not is_tenant_id(value):
        raise InvalidArgument(TENANT_ID_INVALID, f"{field} must match {TENANT_ID_RULE}", field)
