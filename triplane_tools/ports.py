"""Who holds a TCP port: the listening sockets on it (from /proc/net/tcp and
tcp6) and the processes whose open files include them (/proc/<pid>/fd), so the
dev stack can refuse a busy port by naming the process instead of leaving the
user to guess. Linux only; elsewhere, and for processes of other users, the
owner is reported as unknown."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# /proc/net/tcp's state column: 0A is LISTEN.
_TCP_LISTEN = "0A"
# A command line is cut to this many characters in a message.
COMMAND_LINE_MAX_CHARS = 200


@dataclass(frozen=True)
class PortHolder:
    """A process with a socket listening on the port."""

    pid: int
    command_line: str
    address: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command_line}) listening on {self.address}"


def _parse_address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """("0100007F:C383") -> (127.0.0.1, 50051): the kernel writes each 32-bit
    word of the address in host (little-endian) byte order."""
    host_hex, _, port_hex = hex_address.partition(":")
    raw = bytes.fromhex(host_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped, int(port_hex, 16)
    return address, int(port_hex, 16)


def _conflicts(listener: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> bool:
    """True when a socket listening on `listener` keeps a server from binding
    `host` on the same port: either side is a wildcard, or they are the same."""
    try:
        wanted = ipaddress.ip_address(host)
    except ValueError:  # a host name: assume it may be any local address
        return True
    return listener.is_unspecified or wanted.is_unspecified or listener == wanted


def listening_inodes(host: str, port: int) -> dict[int, str]:
    """Socket inode -> "address:port" of every TCP socket listening on `port`
    in a way that conflicts with binding `host`; empty where /proc is absent."""
    found: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            address, local_port = _parse_address(fields[1])
            if local_port == port and _conflicts(address, host):
                shown = f"[{address}]" if address.version == 6 else str(address)
                found[int(fields[9])] = f"{shown}:{local_port}"
    return found


def command_line(pid: int) -> str:
    """The process's command line, arguments separated by spaces (cut short)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    text = " ".join(raw.decode(errors="replace").replace("\0", " ").split()) or "?"
    return (
        text if len(text) <= COMMAND_LINE_MAX_CHARS else text[: COMMAND_LINE_MAX_CHARS - 3] + "..."
    )


def port_holders(host: str, port: int) -> list[PortHolder]:
    """Every process this user can see that holds a socket listening on the
    port (a socket shared by several processes, say after a fork, names each)."""
    inodes = listening_inodes(host, port)
    if not inodes:
        return []
    targets = {f"socket:[{inode}]": address for inode, address in inodes.items()}
    holders: list[PortHolder] = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                target = os.readlink(entry / "fd" / fd)
            except OSError:
                continue
            if target in targets:
                pid = int(entry.name)
                holders.append(PortHolder(pid, command_line(pid), targets[target]))
                break
    return sorted(holders, key=lambda holder: holder.pid)


def describe_holders(host: str, port: int) -> str:
    """A phrase naming who holds the port, for an error message."""
    holders = port_holders(host, port)
    if holders:
        return "held by " + "; ".join(holder.describe() for holder in holders)
    if listening_inodes(host, port):
        return "held by a process this user cannot inspect (another user's, or root's)"
    if not (PROC / "net" / "tcp").exists():
        return "held by a process that cannot be found on this system (no /proc)"
    return "held by a process that cannot be found (no listening socket of it in /proc)"
