"""`triplane console ...`: the console's local accounts.

    triplane console add-user rita --role reviewer [--role auditor]
        [--password-file FILE]     (else asked twice on the terminal)
    triplane console set-password rita [--password-file FILE]

Accounts live in the console's store (console.store: SQLite under the state
dir, or PostgreSQL), the password as an argon2 hash; the password itself is
never an argument (it would be in the shell's history and `ps`)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from console.auth import ROLES, UnknownRole, check_roles, hash_password
from console.store import ConsoleStore, UserExists
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import load_config

MIN_PASSWORD_LENGTH = 12


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = subparsers.add_parser("console", help="operator console: local accounts")
    commands = console.add_subparsers(dest="console_command", required=True)
    add = commands.add_parser("add-user", help="create a local account (argon2 hash)")
    add.add_argument("username")
    add.add_argument(
        "--role", action="append", required=True, choices=ROLES, help="repeat for several"
    )
    add.add_argument("--password-file", type=Path, help="read the password from this file")
    add.set_defaults(func=_add_user)
    reset = commands.add_parser("set-password", help="replace a local account's password")
    reset.add_argument("username")
    reset.add_argument("--password-file", type=Path)
    reset.set_defaults(func=_set_password)


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        password = Path(args.password_file).read_text().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("triplane console: the passwords differ", file=sys.stderr)
            return None
    if len(password) < MIN_PASSWORD_LENGTH:
        print(
            f"triplane console: a password has at least {MIN_PASSWORD_LENGTH} characters",
            file=sys.stderr,
        )
        return None
    return password


def _add_user(args: argparse.Namespace) -> int:
    try:
        roles = check_roles(args.role)
    except UnknownRole as error:
        print(f"triplane console: {error}", file=sys.stderr)
        return 2
    username = args.username.strip()
    if not username or len(username) > 64 or "," in username:
        print("triplane console: a username is 1 to 64 characters, no comma", file=sys.stderr)
        return 2
    password = _password(args)
    if password is None:
        return 2
    store = ConsoleStore.from_config(load_config(args.config))
    try:
        store.add_user(username, hash_password(password), list(roles), SystemClock().now_us())
    except UserExists:
        print(f"triplane console: user {username!r} exists", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"added {username} ({', '.join(roles)})")
    return 0


def _set_password(args: argparse.Namespace) -> int:
    password = _password(args)
    if password is None:
        return 2
    store = ConsoleStore.from_config(load_config(args.config))
    try:
        changed = store.set_password(args.username, hash_password(password))
    finally:
        store.close()
    if not changed:
        print(f"triplane console: no user {args.username!r}", file=sys.stderr)
        return 1
    print(f"password of {args.username} replaced")
    return 0
