"""TLS and credentials of NATS connections (nats.tls_*, nats.creds_file,
nats.user with nats.password_file): nats-py `connect` arguments, with every
secret read from its file here (a Kubernetes Secret), never held in the
config. No grpc here: domain modules reach it through the bus."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from triplane.runtime.config import NatsConfig


def nats_options(nats: NatsConfig) -> dict[str, Any]:
    """The connect arguments: `tls` (an SSLContext verifying the server
    against tls_ca_path, presenting tls_cert_path/tls_key_path when set),
    `user_credentials` (a .creds file), or `user` and `password`. Empty when
    none is configured (plaintext, unless the url says tls://)."""
    options: dict[str, Any] = {}
    if nats.tls_ca_path or nats.tls_cert_path:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=nats.tls_ca_path or None
        )
        if nats.tls_cert_path:
            context.load_cert_chain(nats.tls_cert_path, nats.tls_key_path)
        options["tls"] = context
    if nats.creds_file:
        options["user_credentials"] = nats.creds_file
    if nats.user:
        options["user"] = nats.user
        if nats.password_file:
            options["password"] = Path(nats.password_file).read_text().strip()
    return options
