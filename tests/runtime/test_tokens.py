"""Decision tokens as a format: a standard JWS (any JOSE library reads and
verifies one), claims that are read strictly, a split digest that ignores the
order of the legs and nothing else, and trusted keys that follow their files."""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import OKPKey

from triplane.runtime.errors import PermissionDenied
from triplane.runtime.tokens import (
    AUDIENCE,
    DecisionClaims,
    Movement,
    PublicKeySet,
    SplitTerms,
    TokenSigner,
    TokenVerifier,
    ensure_dev_keypair,
    ensure_dev_log_keypair,
    generate_private_key,
    key_id_of,
    public_key_to_b64,
    splits_digest,
)

NOW_S = 1_790_000_000
MOVEMENT = Movement(
    tenant_id="acme",
    kind="authorize",
    debit_account_id="cust",
    credit_account_id="shop",
    amount_minor=1_000,
    currency="USD",
    idempotency_key="pay-1",
)


def _parts(token: str) -> tuple[dict[str, object], dict[str, object]]:
    header, payload, _ = token.split(".")
    decode = lambda part: json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # noqa: E731
    return decode(header), decode(payload)


def test_a_token_is_a_standard_jws_any_jose_library_verifies() -> None:
    key = generate_private_key()
    signer = TokenSigner(key)
    token, claims = signer.issue(
        MOVEMENT, decision_id="dec-1", issued_at_s=NOW_S, ttl_s=900, payment_kind="purchase"
    )
    header, payload = _parts(token)
    assert header == {"alg": "Ed25519", "typ": "triplane-decision+jwt", "kid": signer.key_id}
    assert payload["aud"] == AUDIENCE and payload["iss"] == "triplane.policy"
    assert (payload["iat"], payload["exp"]) == (NOW_S, NOW_S + 900)
    assert payload["jti"] == claims.token_id and len(claims.token_id) == 32
    # joserfc's own Ed25519 (OpenSSL), from the public key as a JWK alone.
    public = OKPKey.import_key(
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": base64.urlsafe_b64encode(bytes(key.verify_key)).rstrip(b"=").decode(),
        }
    )
    verified = jws.deserialize_compact(token, public, algorithms=["Ed25519"])
    assert json.loads(verified.payload) == payload
    # Every issue is another token id.
    again, _ = signer.issue(MOVEMENT, decision_id="dec-1", issued_at_s=NOW_S, ttl_s=900)
    assert _parts(again)[1]["jti"] != payload["jti"]


def test_claims_are_read_strictly() -> None:
    signer = TokenSigner(generate_private_key())
    verifier = TokenVerifier([signer.public_key])
    token, _ = signer.issue(MOVEMENT, decision_id="dec-1", issued_at_s=NOW_S, ttl_s=900)
    header, payload, _signature = token.split(".")
    assert verifier.decode(token, "t").movement() == MOVEMENT
    # An unknown claim, or a claim of the wrong type, signed all the same.
    from joserfc.jws import serialize_compact

    for change in ({"extra": 1}, {"amount_minor": "1000"}):
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims.update(change)
        resigned = serialize_compact(
            _parts(token)[0], json.dumps(claims).encode(), signer._okp, algorithms=["Ed25519"]
        )
        with pytest.raises(PermissionDenied) as caught:
            verifier.decode(resigned, "t")
        assert caught.value.reason == "DECISION_TOKEN_MALFORMED"
    # Another type of JWT (an OAuth2 access token, say) is not a decision token.
    other = serialize_compact(
        {"alg": "Ed25519", "typ": "at+jwt", "kid": signer.key_id},
        base64.urlsafe_b64decode(payload + "=="),
        signer._okp,
        algorithms=["Ed25519"],
    )
    with pytest.raises(PermissionDenied) as caught:
        verifier.decode(other, "t")
    assert caught.value.reason == "DECISION_TOKEN_MALFORMED"
    for garbage in ("", "a.b", "a.b.c", "x" * 3_000, f"{header}.{payload}"):
        with pytest.raises(PermissionDenied) as caught:
            verifier.decode(garbage, "t")
        assert caught.value.reason in ("DECISION_TOKEN_MISSING", "DECISION_TOKEN_MALFORMED")


def test_time_checks_allow_the_configured_skew_and_no_more() -> None:
    signer = TokenSigner(generate_private_key())
    verifier = TokenVerifier([signer.public_key], clock_skew_s=5)
    _, claims = signer.issue(MOVEMENT, decision_id="d", issued_at_s=NOW_S, ttl_s=60)
    for now_s in (NOW_S - 5, NOW_S, NOW_S + 65):
        verifier.check_time(claims, now_s * 1_000_000, "t")
    for now_s, reason in (
        (NOW_S + 66, "DECISION_TOKEN_EXPIRED"),
        (NOW_S - 6, "DECISION_TOKEN_NOT_YET_VALID"),
    ):
        with pytest.raises(PermissionDenied) as caught:
            verifier.check_time(claims, now_s * 1_000_000, "t")
        assert caught.value.reason == reason


_legs = st.lists(
    st.builds(
        SplitTerms,
        st.sampled_from(["fee", "tax", "reserve"]),
        st.sampled_from(["fixed", "basis_points"]),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
        st.sampled_from(["", "fee"]),
        st.sampled_from([0, 1_790_000_000_000_000]),
        st.sampled_from(["", "shop"]),
    ),
    max_size=6,
)


@given(legs=_legs, seed=st.integers(0, 2**32))
def test_the_split_digest_ignores_order_and_nothing_else(legs: list[SplitTerms], seed: int) -> None:
    shuffled = list(legs)
    random.Random(seed).shuffle(shuffled)
    assert splits_digest(shuffled) == splits_digest(legs)
    assert (splits_digest(legs) == "") == (not legs)
    if legs:
        changed = [legs[0]._replace(amount_minor=legs[0].amount_minor + 1), *legs[1:]]
        assert splits_digest(changed) != splits_digest(legs)
        assert splits_digest(legs[:-1]) != splits_digest(legs)


def test_every_movement_term_is_checked_and_named() -> None:
    signer = TokenSigner(generate_private_key())
    _, claims = signer.issue(MOVEMENT, decision_id="d", issued_at_s=NOW_S, ttl_s=60)
    TokenVerifier.check_movement(claims, MOVEMENT, "t")
    changes: dict[str, object] = {
        "tenant_id": "globex",
        "kind": "payout",
        "debit_account_id": "x",
        "credit_account_id": "x",
        "amount_minor": 1,
        "currency": "EUR",
        "splits_digest": "x",
        "idempotency_key": "x",
        "hold_id": "x",
        "entry_id": "x",
    }
    assert set(changes) == set(Movement.__struct_fields__)
    for name, value in changes.items():
        with pytest.raises(PermissionDenied) as caught:
            TokenVerifier.check_movement(
                claims, msgspec.structs.replace(MOVEMENT, **{name: value}), "t"
            )
        assert (caught.value.reason, caught.value.field) == ("DECISION_TOKEN_MISMATCH", f"t.{name}")


def test_trusted_keys_follow_their_files(tmp_path: Path) -> None:
    """A key added to (or removed from) a watched directory is trusted (or no
    longer) at the next check, without a restart; a file that breaks keeps
    the keys it held."""
    now = [0.0]
    first, second = generate_private_key(), generate_private_key()
    directory = tmp_path / "trusted"
    directory.mkdir()
    (directory / "one").write_text(f"# the first key\n{public_key_to_b64(first.verify_key)}\n")
    (directory / ".hidden").write_text("not a key\n")  # Kubernetes' ..data and the like
    keys = PublicKeySet([], [directory], reload_interval_s=10, now_s=lambda: now[0])
    one, two = key_id_of(first.verify_key), key_id_of(second.verify_key)
    assert keys.key_ids() == [one]
    (directory / "two").write_text(public_key_to_b64(second.verify_key) + "\n")
    assert keys.get(two) is None  # not checked again yet
    now[0] = 10
    assert keys.get(two) is not None and keys.get(one) is not None
    (directory / "one").unlink()
    now[0] = 20
    assert keys.get(one) is None and keys.get(two) is not None
    (directory / "two").write_text("garbage\n")
    stat = (directory / "two").stat()
    os.utime(directory / "two", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    now[0] = 30
    assert keys.get(two) is not None
    # At start a file that cannot be read fails loudly.
    with pytest.raises(ValueError):
        PublicKeySet([], [directory / "two"])


def test_a_verifier_forgets_a_key_removed_from_its_set(tmp_path: Path) -> None:
    signer = TokenSigner(generate_private_key())
    path = tmp_path / "keys"
    path.write_text(public_key_to_b64(signer.public_key) + "\n")
    now = [0.0]
    verifier = TokenVerifier(PublicKeySet([], [path], reload_interval_s=1, now_s=lambda: now[0]))
    token, _ = signer.issue(MOVEMENT, decision_id="d", issued_at_s=NOW_S, ttl_s=60)
    verifier.decode(token, "t")
    path.write_text(public_key_to_b64(generate_private_key().verify_key) + "\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    now[0] = 2
    with pytest.raises(PermissionDenied) as caught:
        verifier.decode(token, "t")
    assert caught.value.reason == "DECISION_TOKEN_UNKNOWN_KEY"


def test_the_dev_stack_signs_tokens_and_the_log_with_different_keys(tmp_path: Path) -> None:
    token_private, token_public = ensure_dev_keypair(tmp_path)
    log_private, log_public = ensure_dev_log_keypair(tmp_path)
    assert token_private.read_text() != log_private.read_text()
    assert token_public.read_text() != log_public.read_text()
    assert oct(token_private.stat().st_mode & 0o777) == "0o600"
    # Created once: a second call keeps them.
    assert ensure_dev_keypair(tmp_path)[0].read_text() == token_private.read_text()
    assert DecisionClaims.__struct_config__.forbid_unknown_fields
