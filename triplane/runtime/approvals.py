"""The who and why an operator's approval carries to a plane (PromoteModel,
RollbackModel, ActivateBundle, SetShadowBundle): optional, bounded, recorded
by the plane with the change it approves."""

from __future__ import annotations

from triplane.runtime.errors import InvalidArgument

MAX_ACTOR_CHARS = 256
MAX_REASON_CHARS = 2048


def check_approval(actor: str, reason: str) -> None:
    """INVALID_ARGUMENT FIELD_TOO_LONG naming actor or reason when one is
    longer than its bound; both may be empty (the admin CLI sends neither)."""
    for field, value, most in (
        ("actor", actor, MAX_ACTOR_CHARS),
        ("reason", reason, MAX_REASON_CHARS),
    ):
        if len(value) > most:
            raise InvalidArgument(
                "FIELD_TOO_LONG", f"{field} is {len(value)} characters, at most {most}", field
            )
