"""Mutual TLS for every gRPC server and channel of the mesh.

Each process has one identity, carried by its certificate as a SPIFFE-style
URI SAN (`spiffe://triplane/money_plane`, `.../gateway`, `.../admin` for the
tools); `triplane.runtime.authz` reads it from the peer's certificate and
applies the plane's permission table. The files are PEM: a CA bundle the
peer must chain to, this process's certificate (a chain is fine) and key.
By default they live under `<state_dir>/tls/` (`ca.crt`, `<identity>.crt`,
`<identity>.key`), where the dev stack (`triplane certs dev`) puts them; in
Kubernetes each Deployment mounts its own Secret and names the files in
`runtime.tls`.

Certificates rotate without a restart: a server re-reads the files at the
first TLS handshake after they change (gRPC's dynamic server credentials),
and a client looks every `reload_check_interval_s` and then dials new
connections with the new files (`RotatingChannel`). A half-written rotation
(a new certificate beside the old key) is not taken until the pair matches.

With `runtime.tls: off` every server and channel is plaintext: for local
debugging only, and nothing can tell who calls a plane.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from triplane.runtime.config import Config
from triplane.runtime.retry import RetryPolicy

log = logging.getLogger("triplane.tls")

# The identities of the mesh: one per plane, and one for the admin tools (the
# CLI, the demo, the tests' clients).
GATEWAY = "gateway"
MONEY_PLANE = "money_plane"
POLICY_PLANE = "policy_plane"
AI_PLANE = "ai_plane"
ADMIN = "admin"
# The operator console (console/): its own identity, allowed only the methods
# its pages call (the planes' permission tables).
CONSOLE = "console"
PLANE_IDENTITIES = (GATEWAY, MONEY_PLANE, POLICY_PLANE, AI_PLANE)
IDENTITIES = (*PLANE_IDENTITIES, ADMIN, CONSOLE)

TLS_DIR = "tls"
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

GRPC_OPTIONS = list[tuple[str, Any]]


class TlsSetupError(Exception):
    """TLS is on and its files are missing or unusable; the message says which
    and how to get them."""


def spiffe_id(identity: str, trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/{identity}"


def tls_dir(state_dir: Path) -> Path:
    return state_dir / TLS_DIR


@dataclass(frozen=True)
class TlsFiles:
    """Where one process's TLS files are. A client may go without a
    certificate (a partner at the gateway's public port: `cert_path` None) or
    without a CA bundle (`ca_path` None: the system's roots)."""

    ca_path: Path | None
    cert_path: Path | None = None
    key_path: Path | None = None

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.ca_path, self.cert_path, self.key_path) if p is not None]

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when a file is replaced (inode, mtime, size): a
        Secret's atomic symlink swap and a plain rewrite both show. Raises
        OSError when a file is missing."""
        stats = [os.stat(path) for path in self.paths]
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)


@dataclass(frozen=True)
class TlsMaterial:
    """The bytes of a TlsFiles, checked: the key is the certificate's."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None


def files_for(config: Config, identity: str) -> TlsFiles | None:
    """The TLS files of a process with this identity; None with TLS off."""
    tls = config.runtime.tls
    if not tls.enabled:
        return None
    base = tls_dir(config.state_path)
    return TlsFiles(
        ca_path=Path(tls.ca_path) if tls.ca_path else base / CA_CERT_FILE,
        cert_path=Path(tls.cert_path) if tls.cert_path else base / f"{identity}.crt",
        key_path=Path(tls.key_path) if tls.key_path else base / f"{identity}.key",
    )


def _how_to_get_one(who: str) -> str:
    return (
        f"{who}: create the dev CA and certificates with `triplane certs dev` (the dev stack, "
        "`make up` / `make demo`, does it itself), or point runtime.tls.ca_path, cert_path and "
        "key_path at your own (in Kubernetes: the Secret mounted for this plane); "
        "`runtime.tls: off` runs plaintext, for local debugging only"
    )


def load_material(files: TlsFiles, who: str) -> TlsMaterial:
    """Reads and checks the files. TlsSetupError names a missing or unusable
    file and says how to get one."""
    missing = [str(path) for path in files.paths if not path.is_file()]
    if missing:
        raise TlsSetupError(
            f"runtime.tls is on but {', '.join(missing)} does not exist. {_how_to_get_one(who)}"
        )
    ca = files.ca_path.read_bytes() if files.ca_path else None
    cert = files.cert_path.read_bytes() if files.cert_path else None
    key = files.key_path.read_bytes() if files.key_path else None
    try:
        if ca is not None:
            x509.load_pem_x509_certificates(ca)
        if cert is not None and key is not None:
            _check_pair(cert, key)
    except (ValueError, TypeError) as error:
        raise TlsSetupError(
            f"{who}: unusable TLS files ({error}). {_how_to_get_one(who)}"
        ) from None
    return TlsMaterial(ca, cert, key)


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """ValueError unless the key is the private half of the certificate's (the
    first of a chain) public key."""
    certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certificate.public_key().public_bytes(der, raw) != key.public_key().public_bytes(der, raw):
        raise ValueError("the private key does not match the certificate")


# ---- servers ----


class ServerCertificates:
    """A server's certificate, key and client CA, re-read by gRPC at the first
    handshake after the files change (one stat of each file per handshake,
    not per call). Each port's credentials follow the files on their own."""

    def __init__(self, files: TlsFiles, who: str) -> None:
        self._files = files
        self._who = who
        # Stamped before reading: a change in between is read again next time.
        self._stamp = files.stamp() if all(p.is_file() for p in files.paths) else ()
        self._initial = self._configuration(load_material(files, who))
        self.reloads = 0

    @staticmethod
    def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        assert material.cert is not None and material.key is not None
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.ca
        )

    def credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        """With `require_client_cert`, a client must present a certificate of
        the CA bundle; without, gRPC's Python server does not ask for one (a
        port where callers authenticate otherwise: the gateway's public one)."""
        stamp = [self._stamp]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            """Called by gRPC before each handshake: None keeps what it has."""
            try:
                now = self._files.stamp()
                if now == stamp[0]:
                    return None
                configuration = self._configuration(load_material(self._files, self._who))
            except (OSError, TlsSetupError) as error:
                # Mid-rotation (a file missing, or a new certificate beside the
                # old key): keep serving with the old pair and look again next time.
                log.warning("%s: TLS files changed but are not usable yet: %s", self._who, error)
                return None
            stamp[0] = now
            self.reloads += 1
            log.info("%s: TLS certificate reloaded", self._who, extra={"tls_reloads": self.reloads})
            return configuration

        return grpc.dynamic_ssl_server_credentials(
            self._initial, fetch, require_client_authentication=require_client_cert
        )


# ---- clients ----


def channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
    )


LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")
# gRPC ignores attempts past 5 (its cap); the config refuses more.
GRPC_MAX_ATTEMPTS = 5


def _seconds(value: float) -> str:
    """A duration as the service config writes it ("0.05s")."""
    return f"{value:.9f}".rstrip("0").rstrip(".") + "s"


def channel_options(
    *,
    load_balancing: str = "round_robin",
    retry: RetryPolicy | None = None,
    retry_methods: Sequence[tuple[str, str]] = (),
    authority: str = "",
    transparent_retries: bool = True,
    extra: GRPC_OPTIONS | None = None,
) -> GRPC_OPTIONS:
    """The one builder of client channel options (the gateway's channels to
    the planes, the typed client's).

    A target may resolve to many addresses (`dns:///svc:port` on a headless
    Service, `ipv4:a:p,b:p`); `load_balancing` round_robin sends each call to
    the next ready one, and a replica that goes away is left out once its
    connection fails. The service config is the channel's own: DNS TXT
    records are not asked for one.

    `retry`: gRPC's retryPolicy on UNAVAILABLE only, for `retry_methods`
    ((service, method); method "" for every method of the service), which the
    caller vouches are idempotent; bounded by `retry.maximum_attempts` and by
    each call's deadline, and throttled (retryThrottling) so a plane that is
    down is not sent every call several times. Calls that never reached a
    server are retried by gRPC anyway (transparent retries), unless
    `transparent_retries` is False and nothing is retried.

    `authority`: the name the server's certificate must carry, where the
    target's own name is not it (an `ipv4:` list; the dev certificates name
    localhost and 127.0.0.1). A dns:/// target is checked against its host."""
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(
            f"load balancing policy {load_balancing!r}: one of {LOAD_BALANCING_POLICIES}"
        )
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    attempts = min(retry.maximum_attempts, GRPC_MAX_ATTEMPTS) if retry else 1
    retrying = attempts > 1 and bool(retry_methods)
    if retrying and retry is not None:
        names = [
            {"service": service, "method": method} if method else {"service": service}
            for service, method in retry_methods
        ]
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": _seconds(retry.initial_interval_s),
                    "maxBackoff": _seconds(retry.maximum_interval_s),
                    "backoffMultiplier": retry.backoff_coefficient,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    options: GRPC_OPTIONS = [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.service_config_disable_resolution", 1),
        # 0 turns off transparent retries too.
        ("grpc.enable_retries", 1 if retrying or transparent_retries else 0),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return options + list(extra or ())


def channel_options_for(
    config: Config,
    retry_methods: Sequence[tuple[str, str]] = (),
    extra: GRPC_OPTIONS | None = None,
) -> GRPC_OPTIONS:
    """channel_options by `runtime.grpc`."""
    grpc_config = config.runtime.grpc
    return channel_options(
        load_balancing=grpc_config.load_balancing,
        retry=grpc_config.retry,
        retry_methods=retry_methods,
        extra=extra,
    )


def with_list_authority(address: str, options: GRPC_OPTIONS | None) -> GRPC_OPTIONS | None:
    """For an address list (`ipv4:127.0.0.1:5001,127.0.0.1:5002`, how
    `triplane up --replicas` and the tests reach replicas), the name the
    servers' certificates are checked against: the first address's host,
    unless the options name one (grpc.default_authority). gRPC has no host
    name to check for such a target and refuses every handshake otherwise."""
    if not address.startswith(("ipv4:", "ipv6:")):
        return options
    if any(name == "grpc.default_authority" for name, _ in options or ()):
        return options
    first = address.split(":", 1)[1].split(",", 1)[0]
    host = first.rsplit(":", 1)[0].strip("[]") if first.count(":") >= 1 else first
    return [*(options or ()), ("grpc.default_authority", host)]


def open_channel(
    address: str, files: TlsFiles | None, options: GRPC_OPTIONS | None = None, who: str = ""
) -> grpc.aio.Channel:
    """A grpc.aio channel: mutual TLS with `files`, plaintext with None."""
    if files is None:
        return grpc.aio.insecure_channel(address, options=options)
    material = load_material(files, who or f"channel to {address}")
    options = with_list_authority(address, options)
    return grpc.aio.secure_channel(address, channel_credentials(material), options=options)


def open_sync_channel(
    address: str, files: TlsFiles | None, options: GRPC_OPTIONS | None = None, who: str = ""
) -> grpc.Channel:
    """As open_channel, for synchronous gRPC (a CLI command)."""
    if files is None:
        return grpc.insecure_channel(address, options=options)
    material = load_material(files, who or f"channel to {address}")
    options = with_list_authority(address, options)
    return grpc.secure_channel(address, channel_credentials(material), options=options)


def channel_for(
    config: Config,
    address: str,
    identity: str = ADMIN,
    options: GRPC_OPTIONS | None = None,
) -> grpc.aio.Channel:
    """A channel to a plane as `identity` (the tools are admin), by the config:
    mutual TLS, or plaintext with `runtime.tls: off`."""
    return open_channel(address, files_for(config, identity), options, who=identity)


class RotatingChannel:
    """A client channel that follows its certificate files: every
    `check_interval_s` (on the next call after it) the files are looked at,
    and when they changed and are usable a new channel replaces the old, whose
    calls in flight get `close_grace_s` to finish. On the hot path it costs
    one clock read and a comparison."""

    def __init__(
        self,
        address: str,
        files: TlsFiles | None,
        options: GRPC_OPTIONS | None = None,
        *,
        check_interval_s: float = 5.0,
        close_grace_s: float = 30.0,
        who: str = "",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self._files = files
        self._options = options
        self._check_interval_s = check_interval_s
        self._close_grace_s = close_grace_s
        self._who = who or f"channel to {address}"
        self._monotonic = monotonic
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        if files is not None:
            load_material(files, self._who)  # missing files: say how to get them
            # Stamped before reading: a change in between is read again next time.
            self._stamp = files.stamp()
        self._channel = open_channel(address, files, options, self._who)
        self._next_check = monotonic() + check_interval_s
        self._closing: set[asyncio.Task[None]] = set()
        self.rotations = 0

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to call on now (stubs: rebuild them when it changes)."""
        if self._files is not None and self._monotonic() >= self._next_check:
            self._next_check = self._monotonic() + self._check_interval_s
            self._maybe_rotate(self._files)
        return self._channel

    def _maybe_rotate(self, files: TlsFiles) -> None:
        try:
            stamp = files.stamp()
            if stamp == self._stamp:
                return
            fresh = open_channel(self.address, files, self._options, self._who)
        except (OSError, TlsSetupError) as error:
            log.warning("%s: TLS files changed but are not usable yet: %s", self._who, error)
            return
        old, self._channel, self._stamp = self._channel, fresh, stamp
        self.rotations += 1
        log.info("%s: TLS certificate reloaded; new connections use it", self._who)
        task = asyncio.get_running_loop().create_task(old.close(self._close_grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await self._channel.close()
