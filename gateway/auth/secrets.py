"""The two secrets of partner authentication, read from files (a Kubernetes
Secret mounted in the pod), never from the config map:

- the pepper of the keys' HMAC (`gateway.auth.pepper_file`), which every
  replica must share: without it the stored hashes can neither be checked nor
  made, so a copy of the database is no copy of the keys;
- the bootstrap admin key (`gateway.auth.admin_key_file`), which may manage any
  tenant's keys before any tenant has one.

Left empty in config, both are dev files under `<state_dir>/keys/`, made on
first use (the dev stack makes them before it starts the gateway). A file
named in config must exist: a production gateway never invents a pepper."""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from pathlib import Path

from gateway.auth import apikey
from triplane.runtime.config import ConfigError, GatewayAuthConfig

PEPPER_FILE = "gateway-api-key-pepper"
ADMIN_KEY_FILE = "gateway-admin.key"
MIN_PEPPER_BYTES = 32
# The bootstrap admin key is not a row of the key table: a fixed key id
# keeps it recognisable in logs (tpk_<env>_000000admin0_...).
ADMIN_KEY_ID = "000000admin0"


def _write_once(path: Path, text: str) -> None:
    """Writes `path` (0600) unless it exists; atomic, so two processes making
    it at once both end up reading the one that won."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def dev_pepper_path(state_dir: Path) -> Path:
    return state_dir / "keys" / PEPPER_FILE


def dev_admin_key_path(state_dir: Path) -> Path:
    return state_dir / "keys" / ADMIN_KEY_FILE


def ensure_dev_files(state_dir: Path, environment: str) -> tuple[Path, Path]:
    """The dev pepper and bootstrap admin key under `<state_dir>/keys/`,
    made once (the dev stack calls this before starting the gateway)."""
    pepper = dev_pepper_path(state_dir)
    _write_once(pepper, base64.b64encode(os.urandom(MIN_PEPPER_BYTES)).decode())
    admin = dev_admin_key_path(state_dir)
    _write_once(admin, apikey.make_key(environment, ADMIN_KEY_ID))
    return pepper, admin


def load_pepper(auth: GatewayAuthConfig, state_dir: Path) -> bytes:
    """The configured pepper file's bytes, or the dev one (made on first use)."""
    if auth.pepper_file:
        path = Path(auth.pepper_file)
        if not path.is_file():
            raise ConfigError(
                f"gateway.auth.pepper_file {path} does not exist (mount the Secret there)"
            )
    else:
        path = dev_pepper_path(state_dir)
        _write_once(path, base64.b64encode(os.urandom(MIN_PEPPER_BYTES)).decode())
    try:
        pepper = base64.b64decode(path.read_text().strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{path}: the pepper must be base64") from exc
    if len(pepper) < MIN_PEPPER_BYTES:
        raise ConfigError(f"{path}: the pepper must be at least {MIN_PEPPER_BYTES} bytes")
    return pepper


def admin_key_path(auth: GatewayAuthConfig, state_dir: Path) -> Path:
    return Path(auth.admin_key_file) if auth.admin_key_file else dev_admin_key_path(state_dir)


def load_admin_key(auth: GatewayAuthConfig, state_dir: Path) -> str | None:
    """The bootstrap admin key, checked; None when there is none (no file
    configured and no dev file)."""
    path = admin_key_path(auth, state_dir)
    if not path.is_file():
        if auth.admin_key_file:
            raise ConfigError(f"gateway.auth.admin_key_file {path} does not exist")
        return None
    key = path.read_text().strip()
    if not apikey.KEY_PATTERN.fullmatch(key):
        raise ConfigError(f"{path}: not a Triplane API key (tpk_<env>_<id>_<secret>)")
    return key
