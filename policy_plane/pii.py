"""The names the policy plane must see in clear, sealed wherever they rest.

Sanctions screening needs a payment's names as written, so the gateway sends
them in clear (inside the trust boundary, over mutual TLS). The decision log
keeps every decision's full input for audit and replay; there the names are
sealed (AES-256-GCM, triplane.runtime.secret_files.FieldCipher) under a key
ring from a file (`policy.pii.keys_path`, a Kubernetes Secret; the dev
stack's is created under the state dir), each sealed value naming its key.
What is hashed, chained and signed is the record as stored, sealed names
included, so verification never needs the key.

- `seal` / `open`: a record as stored / as decided. The associated data of
  each sealed name is the decision id and the field, so a sealed name copied
  into another record, or onto the other party, does not open.
- `blinded`: the input as its idempotency fingerprint sees it, names as keyed
  hashes (the fingerprint column must not let anyone try names against it).
- `tokenized`: the input as GetDecision shows it to a caller without
  `pii:read`: each name a token (`ptok_name_` and 32 letters; the same name
  gives the same token within a tenant, until the sealing key rotates).
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from policy_plane.model import DecisionRecord, EvaluationInput
from triplane.runtime.config import PolicyPiiConfig
from triplane.runtime.secret_files import (
    FieldCipher,
    SecretError,
    random_key_b64,
    secret_path,
)

PII_KEYS_FILE = "policy-pii.keys"
TOKEN_PREFIX = "ptok_name_"
TOKEN_CHARS = 32
PARTIES = ("customer", "counterparty")

_SPACES = re.compile(r"\s+")
_TOKEN_LETTERS = str.maketrans("0123456789abcdef", "bcdfghjkmnpqrstv")


def load_cipher(config: PolicyPiiConfig, state_dir: Path) -> FieldCipher:
    """The key ring from its file (the dev stack's is created once, 0600)."""
    path = secret_path(config.keys_path, state_dir, PII_KEYS_FILE, random_key_b64)
    try:
        return FieldCipher.from_file(path)
    except SecretError as exc:
        raise SecretError(f"policy.pii.keys_path: {exc}") from None


def _context(decision_id: str, party: str) -> str:
    return f"triplane.policy.decision|{decision_id}|payment.{party}.name"


def _with_names(inp: EvaluationInput, names: dict[str, str]) -> EvaluationInput:
    payment = inp.payment
    parties = {
        party: msgspec.structs.replace(getattr(payment, party), name=names[party])
        for party in PARTIES
    }
    return msgspec.structs.replace(inp, payment=msgspec.structs.replace(payment, **parties))


def _names(inp: EvaluationInput) -> dict[str, str]:
    return {party: getattr(inp.payment, party).name for party in PARTIES}


class DecisionSealer:
    """Seals and opens the names of decision records (see the module doc)."""

    def __init__(self, cipher: FieldCipher) -> None:
        self.cipher = cipher

    @classmethod
    def from_key_material(cls, keys: list[bytes]) -> DecisionSealer:
        """In a replay worker process: the ring its parent passed on."""
        return cls(FieldCipher(keys))

    def seal(self, record: DecisionRecord) -> DecisionRecord:
        names = _names(record.input)
        if not any(names.values()):
            return record
        sealed = {
            party: self.cipher.seal(name, _context(record.decision_id, party))
            for party, name in names.items()
        }
        return msgspec.structs.replace(record, input=_with_names(record.input, sealed))

    def open(self, record: DecisionRecord) -> DecisionRecord:
        """The record as decided. A record logged before names were sealed
        holds them in clear and is returned as it is."""
        names = _names(record.input)
        if not any(FieldCipher.is_sealed(name) for name in names.values()):
            return record
        opened = {
            party: self.cipher.open(name, _context(record.decision_id, party))
            for party, name in names.items()
        }
        return msgspec.structs.replace(record, input=_with_names(record.input, opened))

    def blinded(self, inp: EvaluationInput) -> EvaluationInput:
        names = _names(inp)
        if not any(names.values()):
            return inp
        return _with_names(
            inp,
            {party: self.cipher.blind(name) if name else "" for party, name in names.items()},
        )

    def token(self, tenant_id: str, name: str) -> str:
        if not name:
            return ""
        canonical = _SPACES.sub(" ", name.strip()).casefold()
        digest = self.cipher.blind(f"{tenant_id}\x1f{canonical}")
        return TOKEN_PREFIX + digest[:TOKEN_CHARS].translate(_TOKEN_LETTERS)

    def tokenized(self, inp: EvaluationInput) -> EvaluationInput:
        """An opened input with each name replaced by its token."""
        names = _names(inp)
        return _with_names(
            inp, {party: self.token(inp.tenant_id, name) for party, name in names.items()}
        )
