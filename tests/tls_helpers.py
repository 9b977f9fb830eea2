"""Mutual TLS for the tests' own planes and clients: the dev CA and a
certificate per identity under a test's state dir (as the dev stack makes
them), and channels as one identity (the admin tools' by default)."""

from __future__ import annotations

from pathlib import Path

import grpc

from triplane.runtime.config import load_config
from triplane.runtime.tls import ADMIN, CA_CERT_FILE, TlsFiles, open_channel, tls_dir
from triplane_tools.certs import ensure_dev_certificates


def dev_certificates(state_dir: Path) -> Path:
    """Creates (or keeps) the dev CA and certificates under state_dir/tls."""
    ensure_dev_certificates(state_dir, load_config(environ={}).runtime.tls)
    return tls_dir(state_dir)


def identity_files(state_dir: Path, identity: str = ADMIN) -> TlsFiles:
    """The files of `identity` under state_dir/tls (created when missing)."""
    directory = dev_certificates(state_dir)
    return TlsFiles(
        ca_path=directory / CA_CERT_FILE,
        cert_path=directory / f"{identity}.crt",
        key_path=directory / f"{identity}.key",
    )


def partner_files(state_dir: Path) -> TlsFiles:
    """What a partner dials the gateway with: the CA only, no certificate."""
    return TlsFiles(ca_path=dev_certificates(state_dir) / CA_CERT_FILE)


def channel_as(state_dir: Path, address: str, identity: str = ADMIN) -> grpc.aio.Channel:
    """A channel to a plane of this state dir, presenting `identity`'s certificate."""
    return open_channel(address, identity_files(state_dir, identity))
