"""The names the policy plane keeps, sealed at rest: the decision log stores
them AES-GCM sealed under the key ring (key id beside each), the chain and
signatures cover the record as stored, idempotency and replay see them in
clear, GetDecision shows them only when asked (reveal_pii), keys rotate."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

import msgspec
import pytest

from policy_plane.app import PolicyPlane, build_engine
from policy_plane.engine import PolicyEngine
from policy_plane.model import canonical_encoder, record_decoder
from policy_plane.permissions import PERMISSIONS
from policy_plane.pii import DecisionSealer, load_cipher
from policy_plane.replay import ReplayParallelism, ReplayWindow, replay_window
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.authz import GATEWAY_ADMIN_AND_CONSOLE
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import AlreadyExists
from triplane.runtime.secret_files import FieldCipher, SecretError, key_id_of

from .conftest import TENANT, Stubs, make_config, payment_input, started_engine

CUSTOMER = "Wilhelmina Quarterstaff"
COUNTERPARTY = "Bartholomew Zygmuntowicz"
SEALED = re.compile(r"enc:v1:([0-9a-f]{16}):[A-Za-z0-9_-]+")


def _stored(engine: PolicyEngine) -> list[tuple[str, str]]:
    """(request_hash, body) of every logged record, as stored."""
    with engine.store.db.read() as tx:
        rows = tx.all("SELECT request_hash, body FROM decision_log ORDER BY seq")
    return [(str(r[0]), str(r[1])) for r in rows]


async def test_names_are_sealed_in_the_log_and_the_chain_still_verifies(
    engine: PolicyEngine,
) -> None:
    inp = payment_input("k1", customer=CUSTOMER, counterparty=COUNTERPARTY)
    decision, _ = await engine.evaluate(inp)
    [(request_hash, body)] = _stored(engine)
    assert "Wilhelmina" not in body and "Zygmuntowicz" not in body
    stored = record_decoder.decode(body)
    for party in (stored.input.payment.customer, stored.input.payment.counterparty):
        match = SEALED.fullmatch(party.name)
        assert match and match.group(1) == engine.sealer.cipher.key_id
    # The fingerprint is of the names' keyed hashes, not of the names.
    clear = hashlib.sha256(canonical_encoder.encode(inp)).hexdigest()
    assert request_hash != clear
    assert engine.sealer.open(stored).input == decision.record.input
    assert (await engine.verify_log()).valid


async def test_a_retry_sees_the_names_and_other_names_are_another_request(
    engine: PolicyEngine,
) -> None:
    first, _ = await engine.evaluate(payment_input("k2", customer=CUSTOMER))
    again, replayed = await engine.evaluate(payment_input("k2", customer=CUSTOMER))
    assert replayed and again.record.decision_id == first.record.decision_id
    with pytest.raises(AlreadyExists) as caught:
        await engine.evaluate(payment_input("k2", customer="Someone Else"))
    assert caught.value.field == "payment.customer.name"


async def test_a_sealed_name_moved_to_another_record_or_party_does_not_open(
    engine: PolicyEngine,
) -> None:
    await engine.evaluate(payment_input("k3", customer=CUSTOMER, counterparty=COUNTERPARTY))
    stored = record_decoder.decode(_stored(engine)[0][1])
    payment = stored.input.payment
    swapped = msgspec.structs.replace(
        stored,
        input=msgspec.structs.replace(
            stored.input,
            payment=msgspec.structs.replace(
                payment, customer=payment.counterparty, counterparty=payment.customer
            ),
        ),
    )
    with pytest.raises(SecretError):
        engine.sealer.open(swapped)
    elsewhere = msgspec.structs.replace(stored, decision_id="another")
    with pytest.raises(SecretError):
        engine.sealer.open(elsewhere)


async def test_replay_opens_the_names_and_stays_deterministic_in_workers(
    engine: PolicyEngine,
) -> None:
    for index in range(8):
        await engine.evaluate(
            payment_input(f"r{index}", customer=f"{CUSTOMER} {index}", amount_minor=1_000 + index)
        )
    window = ReplayWindow(TENANT, "", 0, 2**62, 1_000)
    serial = replay_window(
        engine.store, engine.bundles.resolve, window, "", 3, 5, sealer=engine.sealer
    )
    parallel = replay_window(
        engine.store,
        engine.bundles.resolve,
        window,
        "",
        3,
        5,
        ReplayParallelism(workers=2, min_decisions=1),
        sealer=engine.sealer,
    )
    assert serial.replayed == parallel.replayed == 8
    assert serial.determinism_score == parallel.determinism_score == 1.0


async def test_keys_rotate_old_records_still_open_new_ones_under_the_new_key(
    state_dir: Path, clock: ManualClock
) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    ring = state_dir / "pii.keys"
    ring.write_text(base64.b64encode(old_key).decode() + "\n")
    config = make_config(state_dir, pii={"keys_path": str(ring)})
    engine = await started_engine(config, clock)
    try:
        first, _ = await engine.evaluate(payment_input("rot1", customer=CUSTOMER))
    finally:
        await engine.stop()
        engine.store.db.close()
    # Rotation: the new key first, the old one kept below it for reading.
    ring.write_text(
        "# sealing key first\n"
        + base64.b64encode(new_key).decode()
        + "\n"
        + base64.b64encode(old_key).decode()
        + "\n"
    )
    engine = build_engine(config, clock)
    await engine.start()
    try:
        second, _ = await engine.evaluate(payment_input("rot2", customer=CUSTOMER))
        old = await engine.get_decision(TENANT, first.record.decision_id)
        assert old.record.input.payment.customer.name == CUSTOMER
        key_ids = [
            SEALED.fullmatch(record_decoder.decode(b).input.payment.customer.name)
            for _, b in _stored(engine)
        ]
        assert [m.group(1) for m in key_ids if m] == [key_id_of(old_key), key_id_of(new_key)]
        assert second.record.input.payment.customer.name == CUSTOMER
    finally:
        await engine.stop()
        engine.store.db.close()
    # A ring that lost the old key cannot open what it sealed: loudly.
    ring.write_text(base64.b64encode(new_key).decode() + "\n")
    engine = build_engine(config, clock)
    await engine.start()
    try:
        with pytest.raises(SecretError, match="no longer holds"):
            await engine.get_decision(TENANT, first.record.decision_id)
    finally:
        await engine.stop()
        engine.store.db.close()


def test_the_dev_key_ring_is_made_once_under_the_state_dir_for_its_owner_only(
    state_dir: Path,
) -> None:
    config = make_config(state_dir)
    cipher = load_cipher(config.policy.pii, config.state_path)
    path = state_dir / "keys" / "policy-pii.keys"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_cipher(config.policy.pii, config.state_path).key_id == cipher.key_id
    sealed = cipher.seal(CUSTOMER, "ctx")
    assert FieldCipher.from_file(path).open(sealed, "ctx") == CUSTOMER


def test_only_the_gateway_admin_and_console_identities_may_ask_for_decisions() -> None:
    # GetDecision (and so reveal_pii) is served to these roles only; the
    # console asks for names only for an operator whose role holds pii:read.
    assert PERMISSIONS["/triplane.policy.v1.PolicyService/GetDecision"] == GATEWAY_ADMIN_AND_CONSOLE


async def test_get_decision_shows_names_only_when_asked(plane: PolicyPlane, stubs: Stubs) -> None:
    decision, _ = await plane.engine.evaluate(
        payment_input("g1", customer=CUSTOMER, counterparty=COUNTERPARTY)
    )
    decision_id = decision.record.decision_id
    plain = await stubs.policy.GetDecision(
        pb.GetDecisionRequest(tenant_id=TENANT, decision_id=decision_id)
    )
    names = (plain.input.payment.customer.name, plain.input.payment.counterparty.name)
    assert names == (plain.customer_name_token, plain.counterparty_name_token)
    assert all(re.fullmatch(r"ptok_name_[bcdfghjkmnpqrstv]{32}", n) for n in names)
    revealed = await stubs.policy.GetDecision(
        pb.GetDecisionRequest(tenant_id=TENANT, decision_id=decision_id, reveal_pii=True)
    )
    assert revealed.input.payment.customer.name == CUSTOMER
    assert revealed.input.payment.counterparty.name == COUNTERPARTY
    # The token is the same either way, and the same for the same name.
    assert revealed.customer_name_token == plain.customer_name_token
    other, _ = await plane.engine.evaluate(payment_input("g2", customer=f"  {CUSTOMER.upper()} "))
    again = await stubs.policy.GetDecision(
        pb.GetDecisionRequest(tenant_id=TENANT, decision_id=other.record.decision_id)
    )
    assert again.customer_name_token == plain.customer_name_token


def test_a_sealer_from_key_material_opens_what_the_plane_sealed(engine: PolicyEngine) -> None:
    sealer = DecisionSealer.from_key_material(engine.sealer.cipher.key_material)
    sealed = engine.sealer.cipher.seal(CUSTOMER, "c")
    assert sealer.cipher.open(sealed, "c") == CUSTOMER
