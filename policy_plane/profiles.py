"""Customer profiles: what the platform's KYC established about a customer.

Evaluate reads the KYC tier, PEP status, verified country and account age of
the payment's customer from here, never from what its caller declares, and
logs what it read in the decision's snapshot (so a replay sees the same
facts). A customer without a profile is unknown to the rules.

Profiles are read from the store on every decision (a primary-key read: on
the event loop for a local SQLite file, in a worker thread for PostgreSQL),
not cached in memory: a change made through one replica is what every
replica decides on from the next request (ARCHITECTURE.md rule 9). Every
change is recorded with its actor and time, applied or not: a KYC result
verified before the one in force (a late or redelivered one) changes
nothing, so results arriving out of order cannot roll a customer back.
"""

from __future__ import annotations

import asyncio

import msgspec

from policy_plane import validate
from policy_plane.store import PolicyStore
from triplane.runtime.clock import Clock
from triplane.runtime.config import PolicyLimitsConfig
from triplane.runtime.errors import AlreadyExists, InvalidArgument, NotFound

DAY_US = 86_400_000_000


class CustomerProfile(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    customer_id: str
    kyc_tier: int
    pep: bool = False
    country: str = ""
    account_opened_at_us: int
    verified_at_us: int = 0
    # Who made the change in force, when (this plane's clock), and its id.
    updated_by: str = ""
    updated_at_us: int = 0
    change_id: str = ""


class ProfileChange(msgspec.Struct, frozen=True, kw_only=True):
    """One recorded change: the audit trail of a profile."""

    change_id: str
    profile: CustomerProfile
    actor: str
    recorded_at_us: int
    applied: bool
    # verified_at as the caller gave it (0: unset, so now), to know a retry.
    requested_verified_at_us: int = 0


_profile_decoder = msgspec.json.Decoder(CustomerProfile)
_change_decoder = msgspec.json.Decoder(ProfileChange)
_encoder = msgspec.json.Encoder(order="sorted")


def account_age_days(profile: CustomerProfile, at_us: int) -> int:
    """Whole days from the account's opening to `at_us` (0 before it)."""
    return max(0, (at_us - profile.account_opened_at_us) // DAY_US)


class ProfileBook:
    def __init__(self, store: PolicyStore, clock: Clock, limits: PolicyLimitsConfig) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
        self._reads_are_local = store.db.reads_are_local

    async def for_decision(self, tenant_id: str, customer_id: str) -> CustomerProfile | None:
        """The profile a decision reads; None for an unknown customer."""
        if not customer_id:
            return None
        if self._reads_are_local:
            body = self._store.get_customer_profile(tenant_id, customer_id)
        else:
            body = await asyncio.to_thread(self._store.get_customer_profile, tenant_id, customer_id)
        return _profile_decoder.decode(body) if body is not None else None

    def _check(self, profile: CustomerProfile, change_id: str, actor: str) -> None:
        limits = self._limits
        validate.check_id(profile.customer_id, "profile.customer_id", limits)
        validate.check_id(change_id, "change_id", limits)
        if not actor:
            raise InvalidArgument("FIELD_REQUIRED", "actor is required", "actor")
        # The actor the caller named (at most max_string_length, checked by
        # the servicer) and the identity it came through.
        validate.check_text(actor, "actor", 2 * limits.max_string_length)
        if not 0 <= profile.kyc_tier <= validate.MAX_KYC_TIER:
            raise InvalidArgument(
                "KYC_TIER_INVALID", f"kyc_tier is 0..{validate.MAX_KYC_TIER}", "profile.kyc_tier"
            )
        validate.check_country(profile.country, "profile.country")
        if profile.account_opened_at_us <= 0:
            raise InvalidArgument(
                "FIELD_REQUIRED", "account_opened_at is required", "profile.account_opened_at"
            )

    def put(
        self, profile: CustomerProfile, change_id: str, actor: str
    ) -> tuple[CustomerProfile, bool, bool]:
        """Records a change and applies it unless an equal or later
        verification is in force: (profile in force, replayed, applied)."""
        self._check(profile, change_id, actor)
        now_us = self._clock.now_us()
        requested_verified_at_us = profile.verified_at_us
        stamped = msgspec.structs.replace(
            profile,
            verified_at_us=profile.verified_at_us or now_us,
            updated_by=actor,
            updated_at_us=now_us,
            change_id=change_id,
        )
        change = ProfileChange(
            change_id=change_id,
            profile=stamped,
            actor=actor,
            recorded_at_us=now_us,
            applied=True,
            requested_verified_at_us=requested_verified_at_us,
        )
        stored_change, in_force, replayed = self._store.put_customer_profile(
            profile.tenant_id,
            profile.customer_id,
            change_id,
            stamped.verified_at_us,
            _encoder.encode(stamped).decode(),
            lambda applied: _encoder.encode(
                msgspec.structs.replace(change, applied=applied)
            ).decode(),
            now_us,
        )
        recorded = _change_decoder.decode(stored_change)
        if replayed:
            _same_change(recorded, profile)
        current = _profile_decoder.decode(in_force)
        return current, replayed, recorded.applied

    def get(self, tenant_id: str, customer_id: str) -> tuple[CustomerProfile, list[ProfileChange]]:
        validate.check_id(customer_id, "customer_id", self._limits)
        body = self._store.get_customer_profile(tenant_id, customer_id)
        if body is None:
            raise NotFound(
                "CUSTOMER_PROFILE_NOT_FOUND",
                f"no profile for customer {customer_id!r}",
                "customer_id",
            )
        changes = self._store.customer_profile_changes(
            tenant_id, customer_id, self._limits.max_profile_changes_listed
        )
        return _profile_decoder.decode(body), [_change_decoder.decode(c) for c in changes]


_COMPARED = ("customer_id", "kyc_tier", "pep", "country", "account_opened_at_us")
_PROTO_FIELDS = {"account_opened_at_us": "profile.account_opened_at"}


def _same_change(recorded: ProfileChange, profile: CustomerProfile) -> None:
    """A retry of a change must carry the same profile (rule 6)."""
    old = recorded.profile
    for name in _COMPARED:
        if getattr(old, name) != getattr(profile, name):
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                f"change_id already used for another profile ({name} differs)",
                _PROTO_FIELDS.get(name, f"profile.{name}"),
            )
    if profile.verified_at_us and profile.verified_at_us != recorded.requested_verified_at_us:
        raise AlreadyExists(
            "IDEMPOTENCY_KEY_REUSED",
            "change_id already used for another profile (verified_at differs)",
            "profile.verified_at",
        )
