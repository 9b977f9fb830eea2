"""API keys without a server: the format and its checksum, the stored hash,
the key admin (create, list, rotate, revoke) on SQLite and PostgreSQL, and
the authenticator's answers and cache, with an injected clock."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth import apikey, secrets
from gateway.auth.admin import ApiKeyAdmin
from gateway.auth.authenticator import Authenticator
from gateway.auth.principal import KIND_ADMIN, KIND_API_KEY, Principal
from gateway.auth.scopes import ALL_SCOPES, EVENTS_WRITE, KEYS_ADMIN, PAYMENTS_WRITE, PII_READ
from gateway.auth.store import ApiKeyStore
from triplane.runtime import codec
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ConfigError, GatewayAuthConfig, load_config
from triplane.runtime.db import Database
from triplane.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TriplaneError,
    Unauthenticated,
)

PEPPER = b"p" * 32
ADMIN = Principal(KIND_ADMIN, "admin:test", "", frozenset({KEYS_ADMIN}))
DAY_S = 86_400


def _auth_config(**changes: object) -> GatewayAuthConfig:
    auth = {"cache_ttl_s": 10.0, "rotation_overlap_s": 3600, **changes}
    return load_config(environ={}, overrides={"gateway": {"auth": auth}}).gateway.auth


# ---------------------------------------------------------------- the format


def test_a_key_has_the_documented_shape_and_a_crc32_checksum() -> None:
    key_id = apikey.new_key_id()
    key = apikey.make_key("live", key_id)
    assert key.startswith(f"tpk_live_{key_id}_")
    assert apikey.KEY_PATTERN.fullmatch(key)
    # The README's regex, as a secret scanner would be given it.
    assert re.fullmatch(r"tpk_(live|test)_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}", key)
    body, check = key[:-6], key[-6:]
    assert int_base62(check) == zlib.crc32(body.encode())
    assert apikey.parse(key) == apikey.ParsedKey("live", key_id)


def int_base62(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + apikey.BASE62.index(char)
    return value


def test_keys_are_distinct() -> None:
    keys = {apikey.make_key("test", apikey.new_key_id()) for _ in range(200)}
    assert len(keys) == 200


# One key for every example: a fresh random secret per example would make the
# character at a drawn position differ between Hypothesis's replays of the
# same example (FlakyStrategyDefinition).
CHANGED_KEY = apikey.make_key("test", "AAAAAAAAAAAA")


@given(st.integers(min_value=0, max_value=len("tpk_test_") + 50 - 1), st.data())
def test_any_one_changed_character_fails_the_checksum_or_the_format(
    position: int, data: st.DataObject
) -> None:
    key = CHANGED_KEY
    if position < len("tpk_test_") or key[position] == "_":
        return  # the prefix and separators: the format check's job
    replacement = data.draw(st.sampled_from(apikey.BASE62).filter(lambda c: c != key[position]))
    changed = key[:position] + replacement + key[position + 1 :]
    with pytest.raises(Unauthenticated) as refused:
        apikey.parse(changed)
    assert refused.value.reason == apikey.CREDENTIAL_CHECKSUM_INVALID


@pytest.mark.parametrize(
    "token",
    ["", "tpk_live_short", "sk_live_" + "a" * 50, "tpk_prod_" + "A" * 12 + "_" + "B" * 38],
)
def test_malformed_keys_are_refused_before_any_lookup(token: str) -> None:
    with pytest.raises(Unauthenticated) as refused:
        apikey.parse(token)
    assert refused.value.reason == apikey.CREDENTIAL_MALFORMED


def test_the_stored_hash_needs_the_pepper() -> None:
    key = apikey.make_key("test", apikey.new_key_id())
    assert apikey.keyed_hash(PEPPER, key) != apikey.keyed_hash(b"q" * 32, key)
    assert key not in apikey.keyed_hash(PEPPER, key)


# ---------------------------------------------------------------- secrets files


def test_dev_files_are_made_once_owner_only_and_configured_ones_must_exist(
    state_dir: Path,
) -> None:
    pepper_path, admin_path = secrets.ensure_dev_files(state_dir, "test")
    first = (pepper_path.read_text(), admin_path.read_text())
    secrets.ensure_dev_files(state_dir, "test")
    assert (pepper_path.read_text(), admin_path.read_text()) == first
    assert pepper_path.stat().st_mode & 0o077 == 0
    assert admin_path.stat().st_mode & 0o077 == 0
    config = _auth_config()
    assert len(secrets.load_pepper(config, state_dir)) >= 32
    assert secrets.load_admin_key(config, state_dir) == first[1].strip()
    with pytest.raises(ConfigError, match="pepper_file"):
        secrets.load_pepper(_auth_config(pepper_file=str(state_dir / "absent")), state_dir)
    with pytest.raises(ConfigError, match="admin_key_file"):
        secrets.load_admin_key(_auth_config(admin_key_file=str(state_dir / "absent")), state_dir)
    short = state_dir / "short"
    short.write_text("c2hvcnQ=")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        secrets.load_pepper(_auth_config(pepper_file=str(short)), state_dir)


def test_without_a_dev_admin_key_there_is_none(tmp_path: Path) -> None:
    assert secrets.load_admin_key(_auth_config(), tmp_path) is None


# ---------------------------------------------------------------- the admin


@pytest.fixture(params=["sqlite", "postgres"])
def key_db(request: pytest.FixtureRequest, state_dir: Path) -> Iterator[Database]:
    if request.param == "postgres":
        db = Database("postgres", request.getfixturevalue("pg_dsn"))
    else:
        db = Database("sqlite", str(state_dir / "keys.db"))
    yield db
    db.close()


class Keys:
    def __init__(self, db: Database, config: GatewayAuthConfig | None = None) -> None:
        self.config = config or _auth_config()
        self.clock = ManualClock()
        self.store = ApiKeyStore(db)
        self.authenticator = Authenticator(self.config, self.store, PEPPER, self.clock)
        self.admin = ApiKeyAdmin(
            self.store, PEPPER, self.config, self.clock, 256, self.authenticator.forget
        )

    async def make(self, tenant: str = "acme", scopes: tuple[str, ...] = (PAYMENTS_WRITE,)) -> str:
        made = await self.admin.create(ADMIN, tenant, apikey.new_key_id(), scopes, "", 0)
        return made.secret

    async def who(self, key: str) -> Principal:
        return await self.authenticator.authenticate(f"Bearer {key}")

    async def refused(self, key: str) -> str:
        with pytest.raises(Unauthenticated) as refused:
            await self.who(key)
        return refused.value.reason


async def test_a_key_is_shown_once_and_a_retry_gets_it_without_its_secret(
    key_db: Database,
) -> None:
    keys = Keys(key_db)
    made = await keys.admin.create(ADMIN, "acme", "idem-1", [EVENTS_WRITE, PAYMENTS_WRITE], "a", 0)
    assert made.secret and not made.replayed
    assert made.record.scopes == (EVENTS_WRITE, PAYMENTS_WRITE)
    # Only the keyed hash is stored.
    assert made.secret not in repr(key_db.read_one("SELECT * FROM gw_api_keys"))
    again = await keys.admin.create(ADMIN, "acme", "idem-1", [PAYMENTS_WRITE, EVENTS_WRITE], "a", 0)
    assert again.replayed and again.secret == "" and again.record == made.record
    with pytest.raises(AlreadyExists) as other:
        await keys.admin.create(ADMIN, "acme", "idem-1", [PAYMENTS_WRITE], "a", 0)
    assert other.value.field == "scopes"
    principal = await keys.who(made.secret)
    assert (principal.kind, principal.tenant_id, principal.credential_id) == (
        KIND_API_KEY,
        "acme",
        made.record.key_id,
    )
    assert principal.scopes == {EVENTS_WRITE, PAYMENTS_WRITE}


async def test_create_refuses_what_it_cannot_make(key_db: Database) -> None:
    keys = Keys(key_db, _auth_config(max_keys_per_tenant=2))
    cases: list[tuple[dict[str, object], type[TriplaneError], str, str]] = [
        ({"scopes": []}, InvalidArgument, "FIELD_REQUIRED", "scopes"),
        ({"scopes": ["payments:write", "root"]}, InvalidArgument, "SCOPE_UNKNOWN", "scopes[1]"),
        ({"tenant_id": ""}, InvalidArgument, "FIELD_REQUIRED", "tenant_id"),
        ({"tenant_id": "Acme.*"}, InvalidArgument, "INVALID_TENANT_ID", "tenant_id"),
        ({"idempotency_key": ""}, InvalidArgument, "FIELD_REQUIRED", "idempotency_key"),
        ({"expires_at_us": 1}, InvalidArgument, "EXPIRY_IN_PAST", "expires_at"),
        ({"display_name": "x" * 257}, InvalidArgument, "FIELD_TOO_LONG", "display_name"),
    ]
    for changes, error, reason, field in cases:
        args: dict[str, object] = {
            "tenant_id": "acme",
            "idempotency_key": apikey.new_key_id(),
            "scopes": [PAYMENTS_WRITE],
            "display_name": "",
            "expires_at_us": 0,
            **changes,
        }
        with pytest.raises(error) as refused:
            await keys.admin.create(ADMIN, **args)  # type: ignore[arg-type]
        assert (refused.value.reason, refused.value.field) == (reason, field), changes
    await keys.make()
    await keys.make()
    with pytest.raises(ResourceExhausted, match="max_keys_per_tenant"):
        await keys.make()
    await keys.make("other")  # a bound per tenant


async def test_a_tenant_key_manages_its_own_tenant_and_grants_only_what_it_has(
    key_db: Database,
) -> None:
    keys = Keys(key_db)
    manager = await keys.who(await keys.make("acme", (KEYS_ADMIN, PAYMENTS_WRITE)))
    made = await keys.admin.create(manager, "acme", "m1", [PAYMENTS_WRITE], "", 0)
    assert made.record.tenant_id == "acme"
    with pytest.raises(PermissionDenied) as refused:
        await keys.admin.create(manager, "acme", "m2", [PII_READ], "", 0)
    assert refused.value.reason == "SCOPE_MISSING"
    assert refused.value.metadata["scope"] == PII_READ
    # Another tenant's key is unknown to it.
    other = await keys.admin.create(ADMIN, "other", "o1", [PAYMENTS_WRITE], "", 0)
    with pytest.raises(NotFound):
        await keys.admin.revoke(manager, "acme", other.record.key_id)
    plain = await keys.who(await keys.make("acme", (PAYMENTS_WRITE,)))
    with pytest.raises(PermissionDenied) as no_scope:
        await keys.admin.list(plain, "acme", 0, "", False)
    assert no_scope.value.metadata["scope"] == KEYS_ADMIN


async def test_list_pages_oldest_first_and_leaves_revoked_keys_out_unless_asked(
    key_db: Database,
) -> None:
    keys = Keys(key_db)
    made = []
    for _ in range(5):
        made.append(
            (
                await keys.admin.create(ADMIN, "acme", apikey.new_key_id(), [PAYMENTS_WRITE], "", 0)
            ).record
        )
        keys.clock.advance(1)
    await keys.make("other")
    await keys.admin.revoke(ADMIN, "acme", made[1].key_id)
    seen, token = [], ""
    while True:
        page, token = await keys.admin.list(ADMIN, "acme", 2, token, True)
        seen += [r.key_id for r in page]
        if not token:
            break
    assert seen == [r.key_id for r in made]
    live, token = await keys.admin.list(ADMIN, "acme", 0, "", False)
    assert [r.key_id for r in live] == [r.key_id for i, r in enumerate(made) if i != 1]
    assert token == ""
    with pytest.raises(InvalidArgument) as garbled:
        await keys.admin.list(
            ADMIN, "acme", 0, codec.encode_page_token("gateway.dead_letters", (1, "x")), False
        )
    assert garbled.value.reason == codec.PAGE_TOKEN_INVALID


async def test_rotation_keeps_the_old_key_for_the_overlap_then_stops_it(key_db: Database) -> None:
    keys = Keys(key_db)
    made = await keys.admin.create(ADMIN, "acme", "k1", [PAYMENTS_WRITE, EVENTS_WRITE], "svc", 0)
    old_key = made.secret
    assert (await keys.who(old_key)).tenant_id == "acme"
    rotation = await keys.admin.rotate(ADMIN, "acme", "r1", made.record.key_id, 600, 0)
    new_key = rotation.new.secret
    assert rotation.new.record.rotated_from == made.record.key_id
    assert rotation.new.record.scopes == made.record.scopes
    assert rotation.old.rotated_to == rotation.new.record.key_id
    assert rotation.old.retires_at_us == keys.clock.now_us() + 600 * 1_000_000
    # Within the overlap both work (the cache was told of the rotation).
    keys.clock.advance(599)
    assert (await keys.who(old_key)).credential_id == made.record.key_id
    assert (await keys.who(new_key)).credential_id == rotation.new.record.key_id
    keys.clock.advance(1)
    assert await keys.refused(old_key) == "CREDENTIAL_ROTATED"
    assert (await keys.who(new_key)).tenant_id == "acme"
    # A retry answers the same rotation without the secret; the old key
    # cannot be rotated twice.
    again = await keys.admin.rotate(ADMIN, "acme", "r1", made.record.key_id, 600, 0)
    assert again.new.replayed and again.new.secret == ""
    assert again.new.record.key_id == rotation.new.record.key_id
    with pytest.raises(FailedPrecondition) as twice:
        await keys.admin.rotate(ADMIN, "acme", "r2", made.record.key_id, 0, 0)
    assert twice.value.reason == "KEY_ALREADY_ROTATED"
    with pytest.raises(InvalidArgument) as too_long:
        await keys.admin.rotate(ADMIN, "acme", "r3", rotation.new.record.key_id, 10**9, 0)
    assert too_long.value.reason == "OVERLAP_TOO_LONG"


async def test_expiry_and_revocation(key_db: Database) -> None:
    keys = Keys(key_db)
    expiring = await keys.admin.create(
        ADMIN, "acme", "e1", [PAYMENTS_WRITE], "", keys.clock.now_us() + DAY_S * 1_000_000
    )
    assert (await keys.who(expiring.secret)).valid_until_us == expiring.record.expires_at_us
    keys.clock.advance(DAY_S)
    assert await keys.refused(expiring.secret) == "CREDENTIAL_EXPIRED"
    with pytest.raises(FailedPrecondition) as expired:
        await keys.admin.rotate(ADMIN, "acme", "e2", expiring.record.key_id, 0, 0)
    assert expired.value.reason == "KEY_EXPIRED"
    revoked = await keys.admin.create(ADMIN, "acme", "v1", [PAYMENTS_WRITE], "", 0)
    assert (await keys.who(revoked.secret)).tenant_id == "acme"
    record = await keys.admin.revoke(ADMIN, "acme", revoked.record.key_id)
    assert record.revoked_at_us == keys.clock.now_us()
    # At once on the replica that revoked it.
    assert await keys.refused(revoked.secret) == "CREDENTIAL_REVOKED"
    keys.clock.advance(5)
    again = await keys.admin.revoke(ADMIN, "acme", revoked.record.key_id)
    assert again.revoked_at_us == record.revoked_at_us


async def test_another_replica_stops_a_revoked_key_within_the_cache_ttl(
    key_db: Database,
) -> None:
    keys = Keys(key_db)
    key = await keys.make()
    replica = Authenticator(keys.config, keys.store, PEPPER, keys.clock)
    assert (await replica.authenticate(f"Bearer {key}")).tenant_id == "acme"
    await keys.admin.revoke(ADMIN, "acme", apikey.parse(key).key_id)
    keys.clock.advance(keys.config.cache_ttl_s - 1)
    assert (await replica.authenticate(f"Bearer {key}")).tenant_id == "acme"  # within the bound
    keys.clock.advance(1)
    with pytest.raises(Unauthenticated) as refused:
        await replica.authenticate(f"Bearer {key}")
    assert refused.value.reason == "CREDENTIAL_REVOKED"


async def test_unknown_wrong_and_foreign_keys_are_refused(key_db: Database) -> None:
    keys = Keys(key_db)
    key = await keys.make()
    parsed = apikey.parse(key)
    # Same key id, another secret (checksum recomputed): the hash does not match.
    forged = apikey.make_key("test", parsed.key_id)
    assert await keys.refused(forged) == "CREDENTIAL_INVALID"
    assert await keys.refused(apikey.make_key("test", apikey.new_key_id())) == "CREDENTIAL_INVALID"
    assert await keys.refused(apikey.make_key("live", parsed.key_id)) == (
        "CREDENTIAL_ENVIRONMENT_MISMATCH"
    )
    assert await keys.refused(key[:-1] + ("A" if key[-1] != "A" else "B")) == (
        "CREDENTIAL_CHECKSUM_INVALID"
    )
    assert await keys.refused("not-a-key") == "CREDENTIAL_MALFORMED"
    with pytest.raises(Unauthenticated) as basic:
        await keys.authenticator.authenticate(f"Basic {key}")
    assert basic.value.reason == "CREDENTIAL_MALFORMED"
    assert await keys.refused("eyJhbGciOiJFUzI1NiJ9.e30.sig") == "JWT_NOT_ACCEPTED"


async def test_the_verification_cache_is_bounded(key_db: Database) -> None:
    keys = Keys(key_db, _auth_config(cache_max_entries=3))
    made = [await keys.make(scopes=tuple(sorted(ALL_SCOPES))) for _ in range(5)]
    for key in made:
        await keys.who(key)
    assert len(keys.authenticator) == 3
    # An entry pushed out is verified again, not refused.
    assert (await keys.who(made[0])).tenant_id == "acme"


async def test_the_bootstrap_admin_key_is_an_admin_of_no_tenant(
    key_db: Database, state_dir: Path
) -> None:
    _, admin_path = secrets.ensure_dev_files(state_dir, "test")
    keys = Keys(key_db)
    admin_key = admin_path.read_text().strip()
    authenticator = Authenticator(keys.config, keys.store, PEPPER, keys.clock, admin_key)
    admin = await authenticator.authenticate(f"Bearer {admin_key}")
    assert admin.is_admin and admin.tenant_id == "" and admin.scopes == {KEYS_ADMIN}
    assert (await keys.admin.create(admin, "acme", "b1", [PAYMENTS_WRITE], "", 0)).secret
