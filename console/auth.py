"""Who may do what in the console, and how a request proves who it is.

Roles and their permissions (a page or action names the permission it needs;
a role holds a set of them):

| role | permissions |
|---|---|
| reviewer | cases:read, cases:resolve, bundles:read |
| risk_admin | cases:read, pii:read, audit:read, bundles:read, bundles:activate, |
| | models:read, experiments:read |
| finance_operator | money:read, money:write |
| sre | health:read, models:read, models:promote |
| auditor | cases:read, money:read, audit:read, health:read, bundles:read, models:read, |
| | experiments:read (read-only) |

`pii:read` decides whether names are shown in clear or as their tokens.

Sessions: a random id in an HttpOnly, SameSite=Lax cookie (Secure when the
console is served over https), stored hashed (console/store.py), ending after
`console.session_idle_s` without a request or `session_absolute_s` after
sign-in, both measured by the injected Clock. A sign-in always makes a new id
(no fixation); signing out deletes it.

CSRF: every request other than GET/HEAD must carry the session's token, in
the form field `csrf_token` or the `X-CSRF-Token` header (htmx sends it from
`<body hx-headers>`). The token is an HMAC of the session id under the
console's session key, so nothing extra is stored and a replica checks it.
Before sign-in the login form is protected the same way against a random
value in a short-lived cookie (double submit).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

if TYPE_CHECKING:
    from console.app import Console

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "reviewer": frozenset({"cases:read", "cases:resolve", "bundles:read"}),
    "risk_admin": frozenset(
        {
            "cases:read",
            "pii:read",
            "audit:read",
            "bundles:read",
            "bundles:activate",
            "models:read",
            "experiments:read",
        }
    ),
    "finance_operator": frozenset({"money:read", "money:write"}),
    "sre": frozenset({"health:read", "models:read", "models:promote"}),
    "auditor": frozenset(
        {
            "cases:read",
            "money:read",
            "audit:read",
            "health:read",
            "bundles:read",
            "models:read",
            "experiments:read",
        }
    ),
}
# The Decisions and Ledger pages (console/pages/decisions.py, ledger.py):
# every role but finance_operator reads decisions (decisions:read);
# risk_admin, sre and auditor may also replay one under another bundle
# (decisions:replay: a replay writes nothing). The ledger is read with
# money:read: finance_operator, sre and auditor; reviewer and risk_admin do
# not see it. Nothing on either page moves money.
_DECISIONS_AND_LEDGER: dict[str, frozenset[str]] = {
    "reviewer": frozenset({"decisions:read"}),
    "risk_admin": frozenset({"decisions:read", "decisions:replay"}),
    "sre": frozenset({"decisions:read", "decisions:replay", "money:read"}),
    "auditor": frozenset({"decisions:read", "decisions:replay"}),
}
ROLE_PERMISSIONS = {
    role: held | _DECISIONS_AND_LEDGER.get(role, frozenset())
    for role, held in ROLE_PERMISSIONS.items()
}
# The Deliveries page (console/pages/deliveries.py): sre reads the gateway's
# delivery queue and puts dead letters back on it; the auditor reads.
ROLE_PERMISSIONS = {
    **ROLE_PERMISSIONS,
    "sre": ROLE_PERMISSIONS["sre"] | {"deliveries:read", "deliveries:redeliver"},
    "auditor": ROLE_PERMISSIONS["auditor"] | {"deliveries:read"},
}
ROLES = tuple(ROLE_PERMISSIONS)

SESSION_COOKIE = "console_session"
LOGIN_COOKIE = "console_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})

_HASHER = PasswordHasher()
# Verified against when the username is unknown, so a wrong name costs what a
# wrong password does (no user enumeration by timing).
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


class UnknownRole(ValueError):
    pass


def check_roles(roles: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise UnknownRole(f"roles must be among {', '.join(ROLES)}; got {', '.join(roles)}")
    return tuple(dict.fromkeys(roles))


def permissions_of(roles: tuple[str, ...]) -> frozenset[str]:
    held: set[str] = set()
    for role in roles:
        held |= ROLE_PERMISSIONS.get(role, frozenset())
    return frozenset(held)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(key: bytes, value: str) -> str:
    """The CSRF token bound to `value` (a session id, or the login cookie)."""
    digest = hmac.new(key, b"csrf:" + value.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def csrf_ok(key: bytes, value: str, presented: str) -> bool:
    return bool(value and presented) and hmac.compare_digest(csrf_token(key, value), presented)


@dataclass(frozen=True)
class Session:
    """The signed-in operator of a request."""

    session_id: str
    username: str
    roles: tuple[str, ...]
    csrf: str

    @property
    def permissions(self) -> frozenset[str]:
        return permissions_of(self.roles)

    def can(self, permission: str) -> bool:
        return permission in self.permissions


async def current_session(console: Console, request: Request) -> Session | None:
    """The request's live session, its idle clock restarted; None when there
    is none or it expired (an expired one is deleted)."""
    session_id = request.cookies.get(SESSION_COOKIE, "")
    if not session_id:
        return None
    stored = await asyncio.to_thread(console.store.session, session_id)
    if stored is None:
        return None
    now = console.clock.now_us()
    settings = console.config.console
    idle = now - stored.last_seen_us > settings.session_idle_s * 1_000_000
    absolute = now - stored.created_us > settings.session_absolute_s * 1_000_000
    if idle or absolute:
        await asyncio.to_thread(console.store.delete_session, session_id)
        return None
    await asyncio.to_thread(console.store.touch_session, session_id, now)
    return Session(
        session_id, stored.username, stored.roles, csrf_token(console.session_key, session_id)
    )


async def presented_csrf(request: Request) -> str:
    header = request.headers.get(CSRF_HEADER, "")
    if header:
        return header
    form = await request.form()
    value = form.get(CSRF_FIELD, "")
    return value if isinstance(value, str) else ""


Handler = Callable[[Request, Session], Awaitable[Response]]


def requires(permission: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A page route's guard: a signed-in session (GET without one: to the
    sign-in page; otherwise 401), the permission (403, audited), and on every
    POST the CSRF token (403 `CSRF_TOKEN_INVALID`, audited). The handler gets
    the Session."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            from console import audit
            from console.app import console_of, error_page

            console = console_of(request)
            session = await current_session(console, request)
            if session is None:
                if request.method in SAFE_METHODS:
                    target = request.url.path
                    if request.url.query:
                        target += "?" + request.url.query
                    return RedirectResponse(f"/login?next={quote(target, safe='')}", 303)
                return error_page(request, None, 401, "SESSION_REQUIRED", "Sign in again.")
            if request.method not in SAFE_METHODS and not csrf_ok(
                console.session_key, session.session_id, await presented_csrf(request)
            ):
                await audit.record(request, session, "csrf.refused", request.url.path, "denied")
                return error_page(
                    request,
                    session,
                    403,
                    "CSRF_TOKEN_INVALID",
                    "The form's token is missing or wrong; reload the page and try again.",
                )
            if not session.can(permission):
                await audit.record(
                    request,
                    session,
                    "permission.refused",
                    request.url.path,
                    "denied",
                    after={"needs": permission},
                )
                return error_page(
                    request,
                    session,
                    403,
                    "PERMISSION_DENIED",
                    f"Your roles ({', '.join(session.roles)}) do not hold {permission}.",
                )
            return await handler(request, session)

        return endpoint

    return wrap
