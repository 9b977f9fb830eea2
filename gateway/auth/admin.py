"""Making, listing, rotating and revoking API keys (ApiKeyService's domain).

Who may: an admin principal (the admin certificate or the bootstrap admin
key) for any tenant it names; a tenant's own credential with `keys:admin`
for that tenant only (the auth interceptor has already bound its tenant),
granting no scope it lacks itself. The whole key exists only in the answer
that made it: a retry under the same idempotency key gets the key's
description with no secret."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.auth import apikey
from gateway.auth.principal import Principal
from gateway.auth.scopes import ALL_SCOPES, KEYS_ADMIN
from gateway.auth.store import ApiKeyRecord, ApiKeyStore, IdempotencyKeyTaken, KeyIdTaken
from triplane.runtime import codec
from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayAuthConfig
from triplane.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from triplane.runtime.ids import check_tenant_id

API_KEYS_PAGE = "gateway.api_keys"
SCOPE_MISSING = "SCOPE_MISSING"
# Attempts at a fresh key id before giving up (a collision of 71 random bits
# is not expected once in the life of the system).
KEY_ID_ATTEMPTS = 3
_US = 1_000_000


@dataclass(frozen=True, slots=True)
class MadeKey:
    record: ApiKeyRecord
    # The whole key; "" when the answer is a replay.
    secret: str
    replayed: bool


@dataclass(frozen=True, slots=True)
class Rotation:
    new: MadeKey
    old: ApiKeyRecord


def missing_scope(scope: str, what: str) -> PermissionDenied:
    return PermissionDenied(
        SCOPE_MISSING, f"{what} needs the scope {scope}", metadata={"scope": scope}
    )


class ApiKeyAdmin:
    def __init__(
        self,
        store: ApiKeyStore,
        pepper: bytes,
        config: GatewayAuthConfig,
        clock: Clock,
        max_string_length: int,
        on_stopped: Callable[[str], None],
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._config = config
        self._clock = clock
        self._max_string_length = max_string_length
        # Told the key id of every key revoked or rotated here, so this
        # replica's verification cache forgets it at once.
        self._on_stopped = on_stopped

    # ---- who may

    def _tenant(self, caller: Principal, tenant_id: str) -> str:
        """The tenant a call manages: the one named (an admin must name one;
        a tenant's credential is already bound to its own)."""
        if not caller.is_admin and not caller.has_scope(KEYS_ADMIN):
            raise missing_scope(KEYS_ADMIN, "managing API keys")
        check_tenant_id(tenant_id)
        return tenant_id

    def _scopes(self, caller: Principal, scopes: Sequence[str]) -> tuple[str, ...]:
        if not scopes:
            raise InvalidArgument("FIELD_REQUIRED", "scopes: at least one", "scopes")
        for index, scope in enumerate(scopes):
            if scope not in ALL_SCOPES:
                raise InvalidArgument(
                    "SCOPE_UNKNOWN",
                    f"{scope[:32]!r} is not a scope ({', '.join(sorted(ALL_SCOPES))})",
                    f"scopes[{index}]",
                )
            if not caller.is_admin and not caller.has_scope(scope):
                raise missing_scope(scope, f"granting {scope}")
        return tuple(sorted(set(scopes)))

    def _expiry(self, expires_at_us: int, field: str) -> int:
        if expires_at_us and expires_at_us <= self._clock.now_us():
            raise InvalidArgument("EXPIRY_IN_PAST", f"{field} is in the past", field)
        return expires_at_us

    def _display_name(self, display_name: str) -> str:
        if len(display_name) > self._max_string_length:
            raise InvalidArgument(
                "FIELD_TOO_LONG",
                f"display_name is longer than {self._max_string_length}",
                "display_name",
            )
        return display_name

    @staticmethod
    def _idempotency_key(key: str) -> str:
        if not key:
            raise InvalidArgument(
                "FIELD_REQUIRED", "idempotency_key is required", "idempotency_key"
            )
        return key

    # ---- create

    async def create(
        self,
        caller: Principal,
        tenant_id: str,
        idempotency_key: str,
        scopes: Sequence[str],
        display_name: str,
        expires_at_us: int,
    ) -> MadeKey:
        tenant_id = self._tenant(caller, tenant_id)
        idempotency_key = self._idempotency_key(idempotency_key)
        wanted = self._scopes(caller, scopes)
        display_name = self._display_name(display_name)
        found = await asyncio.to_thread(self._store.by_idempotency_key, tenant_id, idempotency_key)
        if found is not None:
            return self._replay(found, wanted, display_name, expires_at_us, "")
        expires_at_us = self._expiry(expires_at_us, "expires_at")
        if await asyncio.to_thread(self._store.count_live, tenant_id) >= (
            self._config.max_keys_per_tenant
        ):
            raise ResourceExhausted(
                "API_KEY_LIMIT_REACHED",
                f"tenant holds {self._config.max_keys_per_tenant} keys "
                "(gateway.auth.max_keys_per_tenant): revoke one first",
            )
        return await self._insert(
            lambda key_id, key: self._new_record(
                key_id, key, tenant_id, wanted, display_name, expires_at_us, idempotency_key, ""
            ),
            None,
            (wanted, display_name, expires_at_us, ""),
        )

    def _new_record(
        self,
        key_id: str,
        key: str,
        tenant_id: str,
        scopes: tuple[str, ...],
        display_name: str,
        expires_at_us: int,
        idempotency_key: str,
        rotated_from: str,
    ) -> ApiKeyRecord:
        return ApiKeyRecord(
            key_id=key_id,
            tenant_id=tenant_id,
            environment=self._config.environment,
            key_hash=apikey.keyed_hash(self._pepper, key),
            scopes=scopes,
            display_name=display_name,
            created_at_us=self._clock.now_us(),
            expires_at_us=expires_at_us,
            revoked_at_us=0,
            retires_at_us=0,
            rotated_from=rotated_from,
            rotated_to="",
            idempotency_key=idempotency_key,
        )

    async def _insert(
        self,
        build: Callable[[str, str], ApiKeyRecord],
        rotate: tuple[str, int] | None,
        payload: tuple[tuple[str, ...], str, int, str],
    ) -> MadeKey:
        """Stores a new key (rotating `rotate` = (old key id, retires at) in
        the same transaction), with a fresh key id on the rare collision."""
        for _ in range(KEY_ID_ATTEMPTS):
            key_id = apikey.new_key_id()
            key = apikey.make_key(self._config.environment, key_id)
            record = build(key_id, key)
            try:
                if rotate is None:
                    await asyncio.to_thread(self._store.insert, record)
                elif not await asyncio.to_thread(self._store.rotate, rotate[0], record, rotate[1]):
                    raise FailedPrecondition(
                        "KEY_ALREADY_ROTATED", "the key was rotated or revoked meanwhile", "key_id"
                    )
            except KeyIdTaken:
                continue
            except IdempotencyKeyTaken:
                # A concurrent request with the same idempotency key won.
                found = await asyncio.to_thread(
                    self._store.by_idempotency_key, record.tenant_id, record.idempotency_key
                )
                assert found is not None
                return self._replay(found, *payload)
            return MadeKey(record, key, replayed=False)
        raise RuntimeError("no free API key id after several attempts")

    def _replay(
        self,
        found: ApiKeyRecord,
        scopes: tuple[str, ...],
        display_name: str,
        expires_at_us: int,
        rotated_from: str,
    ) -> MadeKey:
        """The key an earlier request under the same idempotency key made,
        without its secret, provided the payload is the same."""
        for field, before, now in (
            ("scopes", found.scopes, scopes),
            ("display_name", found.display_name, display_name),
            ("expires_at", found.expires_at_us, expires_at_us),
            ("key_id", found.rotated_from, rotated_from),
        ):
            if before != now:
                raise AlreadyExists(
                    "IDEMPOTENCY_KEY_REUSED",
                    f"idempotency_key was used with another {field}",
                    field,
                )
        return MadeKey(found, "", replayed=True)

    # ---- list

    async def list(
        self,
        caller: Principal,
        tenant_id: str,
        page_size: int,
        page_token: str,
        include_revoked: bool,
    ) -> tuple[list[ApiKeyRecord], str]:
        tenant_id = self._tenant(caller, tenant_id)
        size = codec.page_size(
            page_size, self._config.default_page_size, self._config.max_page_size
        )
        position = codec.decode_page_token(page_token, API_KEYS_PAGE, (int, str))
        after = (int(position[0]), str(position[1])) if position is not None else None
        rows = await asyncio.to_thread(
            self._store.page, tenant_id, after, size + 1, include_revoked
        )
        page, more = rows[:size], len(rows) > size
        token = (
            codec.encode_page_token(API_KEYS_PAGE, (page[-1].created_at_us, page[-1].key_id))
            if more
            else ""
        )
        return page, token

    # ---- rotate and revoke

    async def _owned(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        if not key_id:
            raise InvalidArgument("FIELD_REQUIRED", "key_id is required", "key_id")
        record = await asyncio.to_thread(self._store.get, key_id)
        if record is None or record.tenant_id != tenant_id:
            # Another tenant's key is as unknown as no key at all.
            raise NotFound("API_KEY_NOT_FOUND", "no such API key for this tenant", "key_id")
        return record

    def _overlap_s(self, overlap_s: int) -> int:
        if overlap_s < 0:
            raise InvalidArgument("OVERLAP_INVALID", "overlap_s must be >= 0", "overlap_s")
        if overlap_s > self._config.max_rotation_overlap_s:
            raise InvalidArgument(
                "OVERLAP_TOO_LONG",
                f"overlap_s is above {self._config.max_rotation_overlap_s} "
                "(gateway.auth.max_rotation_overlap_s)",
                "overlap_s",
            )
        return overlap_s or self._config.rotation_overlap_s

    async def rotate(
        self,
        caller: Principal,
        tenant_id: str,
        idempotency_key: str,
        key_id: str,
        overlap_s: int,
        expires_at_us: int,
    ) -> Rotation:
        tenant_id = self._tenant(caller, tenant_id)
        idempotency_key = self._idempotency_key(idempotency_key)
        overlap_s = self._overlap_s(overlap_s)
        old = await self._owned(tenant_id, key_id)
        found = await asyncio.to_thread(self._store.by_idempotency_key, tenant_id, idempotency_key)
        if found is not None:
            made = self._replay(found, old.scopes, old.display_name, expires_at_us, key_id)
            return Rotation(made, old)
        now_us = self._clock.now_us()
        stopped = old.stopped(now_us)
        if old.rotated_to:
            raise FailedPrecondition(
                "KEY_ALREADY_ROTATED", f"the key was rotated to {old.rotated_to}", "key_id"
            )
        if stopped:
            reason = {"CREDENTIAL_REVOKED": "KEY_REVOKED"}.get(stopped, "KEY_EXPIRED")
            raise FailedPrecondition(reason, "a key that no longer works is not rotated", "key_id")
        expires_at_us = self._expiry(expires_at_us, "expires_at")
        retires_at_us = now_us + overlap_s * _US
        if old.expires_at_us:
            retires_at_us = min(retires_at_us, old.expires_at_us)
        made = await self._insert(
            lambda new_id, key: self._new_record(
                new_id,
                key,
                tenant_id,
                old.scopes,
                old.display_name,
                expires_at_us,
                idempotency_key,
                key_id,
            ),
            (key_id, retires_at_us),
            (old.scopes, old.display_name, expires_at_us, key_id),
        )
        self._on_stopped(key_id)
        refreshed = await asyncio.to_thread(self._store.get, key_id)
        assert refreshed is not None
        return Rotation(made, refreshed)

    async def revoke(self, caller: Principal, tenant_id: str, key_id: str) -> ApiKeyRecord:
        tenant_id = self._tenant(caller, tenant_id)
        await self._owned(tenant_id, key_id)
        record = await asyncio.to_thread(self._store.revoke, key_id, self._clock.now_us())
        assert record is not None
        self._on_stopped(key_id)
        return record
