"""The operator console in `make demo`: one account per role, and a check
that each role can read its pages.

Before the workload the demo makes one local account per console role
(`demo-reviewer`, `demo-risk-admin`, ...) with a random password, written to
a file only its owner may read (0600, created afresh: an existing file is
never overwritten) under the demo's state dir; the passwords are never
printed or logged, only the file's path and the console's URL. After the
workload it signs in over HTTP as each role, as a browser would (the login
form's CSRF token and cookie), and fetches every page that role may read
(console.pages.discover() against console.auth.ROLE_PERMISSIONS, whatever
pages exist), naming the demo's tenant; a page that does not answer 200 is a
failure of the demo."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

from console.auth import CSRF_FIELD, ROLE_PERMISSIONS, ROLES, hash_password
from console.pages import discover
from console.store import ConsoleStore

ACCOUNTS_FILE = "console-accounts.txt"
USERNAME_PREFIX = "demo-"
# 24 random bytes, URL-safe: 32 characters.
PASSWORD_BYTES = 24
HTTP_TIMEOUT_S = 30.0
_CSRF_INPUT = re.compile(rf'name="{CSRF_FIELD}" value="([^"]+)"')


@dataclass(frozen=True)
class Account:
    username: str
    role: str
    password: str


@dataclass(frozen=True)
class PageCheck:
    role: str
    path: str
    # The HTTP status; 0 when no answer came (connection refused, timeout).
    status: int
    detail: str = ""


@dataclass
class ConsoleReport:
    checks: list[PageCheck]
    elapsed_s: float = 0.0

    def failures(self) -> list[str]:
        return [
            f"console: {c.role} got {c.status or 'no answer'} from {c.path}"
            + (f" ({c.detail})" if c.detail else "")
            for c in self.checks
            if c.status != 200
        ]

    def summary(self) -> str:
        """One line: pages answered of those checked, and per role."""
        ok = sum(c.status == 200 for c in self.checks)
        per_role: dict[str, list[int]] = {}
        for check in self.checks:
            counts = per_role.setdefault(check.role, [0, 0])
            counts[0] += check.status == 200
            counts[1] += 1
        roles = ", ".join(f"{role} {done}/{all_}" for role, (done, all_) in per_role.items())
        return (
            f"console           {ok}/{len(self.checks)} pages answered 200 "
            f"({roles}) in {self.elapsed_s:.1f} s"
        )


def username_of(role: str) -> str:
    return USERNAME_PREFIX + role.replace("_", "-")


def write_accounts_file(path: Path, accounts: Sequence[Account]) -> None:
    """The accounts, one a line (`username role password`), in a new file
    only its owner may read; an existing file is an error (FileExistsError),
    never overwritten or widened."""
    lines = ["# Console accounts of this demo: username role password\n"]
    lines += [f"{a.username} {a.role} {a.password}\n" for a in accounts]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(lines)


def read_accounts_file(path: Path) -> list[Account]:
    accounts = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            username, role, password = line.split(" ")
            accounts.append(Account(username, role, password))
    return accounts


async def create_accounts(
    store: ConsoleStore, path: Path, now_us: int, roles: Sequence[str] = ROLES
) -> list[Account]:
    """One account per role with a random password: the file first (so no
    account exists whose password is nowhere), then the argon2 hashes (in
    threads, together) into the console's store."""
    accounts = [
        Account(username_of(role), role, secrets.token_urlsafe(PASSWORD_BYTES)) for role in roles
    ]
    write_accounts_file(path, accounts)
    hashes = await asyncio.gather(*(asyncio.to_thread(hash_password, a.password) for a in accounts))
    for account, password_hash in zip(accounts, hashes, strict=True):
        await asyncio.to_thread(
            store.add_user, account.username, password_hash, [account.role], now_us
        )
    return accounts


def readable_paths(role: str) -> list[str]:
    """The navigation path of every page `role` may read, in navigation order."""
    held = ROLE_PERMISSIONS[role]
    return [page.path for page in discover() if page.permission in held]


async def _sign_in(http: aiohttp.ClientSession, base_url: str, account: Account) -> PageCheck:
    """Signs the session in through the login form; the check is the POST's
    answer, as 200 when it redirected (303) as a good sign-in does."""
    async with http.get(f"{base_url}/login") as form:
        found = _CSRF_INPUT.search(await form.text())
    if form.status != 200 or found is None:
        return PageCheck(account.role, "/login", form.status, "no login form")
    data = {
        "username": account.username,
        "password": account.password,
        CSRF_FIELD: found.group(1),
        "next": "/",
    }
    async with http.post(f"{base_url}/login", data=data, allow_redirects=False) as answer:
        status = 200 if answer.status == 303 else answer.status
        reason = answer.headers.get("X-Triplane-Reason", "")
    return PageCheck(account.role, "/login", status, "" if status == 200 else reason)


async def _check_role(base_url: str, account: Account, tenant: str) -> list[PageCheck]:
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    # unsafe: keep cookies of an IP address (127.0.0.1), as a browser does.
    jar = aiohttp.CookieJar(unsafe=True)
    checks: list[PageCheck] = []
    async with aiohttp.ClientSession(timeout=timeout, cookie_jar=jar) as http:
        try:
            signed = await _sign_in(http, base_url, account)
        except (aiohttp.ClientError, TimeoutError) as error:
            return [PageCheck(account.role, "/login", 0, type(error).__name__)]
        if signed.status != 200:
            return [signed]
        query = "?" + urlencode({"tenant": tenant}) if tenant else ""
        for path in readable_paths(account.role):
            try:
                async with http.get(f"{base_url}{path}{query}", allow_redirects=False) as page:
                    await page.read()
                    reason = page.headers.get("X-Triplane-Reason", "")
                    checks.append(PageCheck(account.role, path, page.status, reason))
            except (aiohttp.ClientError, TimeoutError) as error:
                checks.append(PageCheck(account.role, path, 0, type(error).__name__))
    return checks


async def check_pages(base_url: str, accounts: Sequence[Account], tenant: str) -> ConsoleReport:
    """Every page each account's role may read, the roles side by side."""
    started = time.monotonic()
    per_role = await asyncio.gather(*(_check_role(base_url, a, tenant) for a in accounts))
    return ConsoleReport(
        [check for checks in per_role for check in checks], time.monotonic() - started
    )
