"""Secrets from files, and the field cipher of what must be kept in clear.

Secrets never live in the config map: the config names a file (a mounted
Kubernetes Secret in a cluster) and the process reads it at start. The
embedded dev stack has no Secret store, so an empty path means a file under
`<state_dir>/keys/`, created once with fresh random bytes and mode 0600.

`FieldCipher` is the field-level encryption of values a plane must keep in
clear for its own work (names the policy plane screens against sanctions
lists): AES-256-GCM (`cryptography`) under a key ring read from such a file.
The first key seals, every key opens (rotation: put the new key first, keep
the old ones until nothing sealed under them is kept), and every sealed value
carries the id of its key. The associated data binds a sealed value to where
it is stored, so a ciphertext moved to another record or field fails to open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEYS_DIR = "keys"
KEY_BYTES = 32
NONCE_BYTES = 12
SEALED_PREFIX = "enc:v1:"


class SecretError(ValueError):
    """A secret file that is missing, unreadable or malformed."""


def read_secret(path: str | Path) -> str:
    """The text of a secret file, surrounding whitespace removed."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise SecretError(f"secret file {path}: {exc.strerror or exc}") from None
    if not text:
        raise SecretError(f"secret file {path} is empty")
    return text


def dev_secret_path(state_dir: Path, name: str, make: Callable[[], str]) -> Path:
    """`<state_dir>/keys/<name>`, created once (0600) with `make()` when absent."""
    path = state_dir / KEYS_DIR / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then linked into place: a process
        # starting beside this one finds either no file or the whole key.
        fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as handle:  # mkstemp: mode 0600
                handle.write(make() + "\n")
            os.link(staged, path)
        except FileExistsError:
            pass  # another process of the stack made it first; theirs stands
        finally:
            os.unlink(staged)
    return path


def secret_path(configured: str, state_dir: Path, dev_name: str, make: Callable[[], str]) -> Path:
    """The configured secret file, or the dev stack's under the state dir."""
    if configured:
        return Path(configured)
    return dev_secret_path(state_dir, dev_name, make)


def random_key_b64() -> str:
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{where}: a key is base64") from None
    if len(key) < KEY_BYTES:
        raise SecretError(f"{where}: a key is at least {KEY_BYTES} bytes")
    return key


def read_key_ring(path: str | Path) -> list[bytes]:
    """One base64 key per line (blank lines and # comments skipped), the
    sealing key first."""
    keys = [
        decode_key(line, f"{path} line {number}")
        for number, line in enumerate(read_secret(path).splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not keys:
        raise SecretError(f"key ring {path} holds no key")
    return keys


def key_id_of(key: bytes) -> str:
    """A key's public name: a digest of it, so two keys never share one."""
    return hashlib.sha256(b"triplane.field-key|" + key).hexdigest()[:16]


class FieldCipher:
    """AES-256-GCM field encryption under a key ring (see the module doc)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise SecretError("a field cipher needs at least one key")
        self._aeads = {key_id_of(k): AESGCM(k[:KEY_BYTES]) for k in keys}
        self.key_id = key_id_of(keys[0])
        self._sealing = self._aeads[self.key_id]
        # Blinding (a keyed hash, for fingerprints of what is sealed) uses a
        # key derived from the sealing key, never the sealing key itself.
        self._blind_key = hmac.digest(keys[0], b"triplane.field-blind", "sha256")
        self._keys = list(keys)

    @classmethod
    def from_file(cls, path: str | Path) -> FieldCipher:
        return cls(read_key_ring(path))

    @property
    def key_material(self) -> list[bytes]:
        """The ring, for worker processes that open sealed values too."""
        return list(self._keys)

    def seal(self, plaintext: str, context: str) -> str:
        """`enc:v1:<key id>:<base64url(nonce | ciphertext | tag)>`; "" stays ""."""
        if not plaintext:
            return ""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._sealing.encrypt(nonce, plaintext.encode(), context.encode())
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{SEALED_PREFIX}{self.key_id}:{body}"

    def open(self, value: str, context: str) -> str:
        """The clear text of a sealed value. A value that was never sealed
        (written before fields were sealed) is returned as it is; a sealed one
        that does not open (unknown key, altered, moved) is SecretError."""
        if not value.startswith(SEALED_PREFIX):
            return value
        key_id, _, body = value[len(SEALED_PREFIX) :].partition(":")
        aead = self._aeads.get(key_id)
        if aead is None:
            raise SecretError(f"sealed under key {key_id}, which the key ring no longer holds")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise SecretError("a sealed value does not open (altered or moved)") from None

    @staticmethod
    def is_sealed(value: str) -> bool:
        return value.startswith(SEALED_PREFIX)

    def blind(self, value: str) -> str:
        """A keyed hash of a clear value: equal values, equal hashes, and no
        dictionary attack on them without the key."""
        return hmac.new(self._blind_key, value.encode(), hashlib.sha256).hexdigest()
