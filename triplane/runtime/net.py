"""Addresses and ports: what a plane dials for a listen address, whether
something listens on a port, and a free port for a test or a local stack."""

from __future__ import annotations

import socket


def dial_address(listen: str) -> str:
    """The address a local client dials for a listen address (0.0.0.0 -> 127.0.0.1)."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def host_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" (brackets of an IPv6 host removed)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def free_port() -> int:
    """A TCP port nothing listens on now (another process may take it before
    it is bound: servers that can should bind port 0 instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
