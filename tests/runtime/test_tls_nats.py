"""NATS with TLS and credentials (nats.tls_*, nats.user + nats.password_file,
through the one connect of triplane.runtime.bus), against the embedded
nats-server started with TLS that verifies client certificates and a user
and password: the configured client gets JetStream; a client without a
certificate, or with the wrong password, does not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from triplane.runtime import bus
from triplane.runtime.config import Config, ConfigError, load_config
from triplane.runtime.tls import CA_CERT_FILE, tls_dir
from triplane_tools.certs import ensure_dev_certificates, issue, load_authority, write_pair
from triplane_tools.natsd import EmbeddedNats

PASSWORD = "s3cret-of-the-test"


@pytest.fixture
def secured_nats(state_dir: Path) -> Iterator[EmbeddedNats]:
    ensure_dev_certificates(state_dir, load_config(environ={}).runtime.tls)
    directory = tls_dir(state_dir)
    authority = load_authority(directory)
    assert authority is not None
    certificate, key = issue(authority, "spiffe://triplane/nats")
    write_pair(directory / "nats.crt", directory / "nats.key", certificate, key)
    server = EmbeddedNats(
        state_dir / "nats",
        extra_args=[
            "--tlscert", str(directory / "nats.crt"),
            "--tlskey", str(directory / "nats.key"),
            "--tlscacert", str(directory / CA_CERT_FILE),
            "--tlsverify",
            "--user", "triplane",
            "--pass", PASSWORD,
        ],
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def nats_config(state_dir: Path, url: str, password: str = PASSWORD, **nats: Any) -> Config:
    directory = tls_dir(state_dir)
    password_file = state_dir / "nats-password"
    password_file.write_text(password + "\n")
    settings = {
        "url": url,
        "connect_timeout_s": 2.0,
        "tls_ca_path": str(directory / CA_CERT_FILE),
        "tls_cert_path": str(directory / "admin.crt"),
        "tls_key_path": str(directory / "admin.key"),
        "user": "triplane",
        "password_file": str(password_file),
        **nats,
    }
    return load_config(
        environ={}, overrides={"runtime": {"state_dir": str(state_dir)}, "nats": settings}
    )


async def test_a_configured_client_gets_jetstream_over_tls(
    secured_nats: EmbeddedNats, state_dir: Path
) -> None:
    config = nats_config(state_dir, secured_nats.url)
    client = await bus.connect(config.nats, "tls-test", fail_fast=True)
    try:
        assert client.is_connected
        js = client.jetstream()
        await bus.ensure_streams(js, config.nats, ["TRIPLANE_MONEY"])
        ack = await js.publish("triplane.money.acme.test.tls", b"over tls")
        assert ack.stream == "TRIPLANE_MONEY"
    finally:
        await client.close()


async def test_a_client_without_a_certificate_is_refused(
    secured_nats: EmbeddedNats, state_dir: Path
) -> None:
    config = nats_config(state_dir, secured_nats.url, tls_cert_path="", tls_key_path="")
    # The server ends the TLS handshake: the connection is reset.
    with pytest.raises(OSError):
        client = await bus.connect(config.nats, "tls-test", fail_fast=True)
        await client.close()


async def test_a_wrong_password_is_refused(secured_nats: EmbeddedNats, state_dir: Path) -> None:
    config = nats_config(state_dir, secured_nats.url, password="not the password")
    with pytest.raises(Exception, match="Authorization Violation"):
        client = await bus.connect(config.nats, "tls-test", fail_fast=True)
        await client.close()


def test_nats_credentials_are_checked_at_load(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"password_file needs nats\.user"):
        load_config(environ={}, overrides={"nats": {"password_file": "/x"}})
    with pytest.raises(ConfigError, match="set together"):
        load_config(environ={}, overrides={"nats": {"tls_cert_path": "/x"}})
