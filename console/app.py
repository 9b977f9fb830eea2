"""The console's Starlette app: `create_app(config)`.

Besides the pages (console/pages/, found by themselves) it serves sign-in and
sign-out, /healthz (200 when its store answers; the stack and Kubernetes
probe it), and /static (htmx and the stylesheet, vendored: nothing is fetched
from elsewhere at run time). Every response carries a strict
Content-Security-Policy (scripts and styles from the console itself only),
`X-Frame-Options: DENY`, `Referrer-Policy: same-origin` and
`Cache-Control: no-store` on pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from console import audit
from console.auth import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    csrf_ok,
    csrf_token,
    current_session,
    new_session_id,
    verify_password,
)
from console.oidc import Oidc
from console.pages import Page, discover
from console.planes import Planes
from console.store import ConsoleStore
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config
from triplane.runtime.currencies import format_minor
from triplane.runtime.secret_files import decode_key, random_key_b64, read_secret, secret_path
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tasks import cancel_and_wait, every

log = logging.getLogger("triplane.console")

HERE = Path(__file__).parent
SESSION_KEY_DEV_NAME = "console-session.key"
LOGIN_COOKIE_MAX_AGE_S = 600
# gRPC status -> HTTP status of the page that reports it.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


@dataclass
class Console:
    """What every route reaches through `console_of(request)`."""

    config: Config
    store: ConsoleStore
    planes: Planes
    clock: Clock
    session_key: bytes
    templates: Jinja2Templates
    pages: list[Page]
    oidc: Oidc | None = None
    secure_cookies: bool = False
    public_url: str = ""


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def load_session_key(config: Config) -> bytes:
    path = secret_path(
        config.console.session_key_file, config.state_path, SESSION_KEY_DEV_NAME, random_key_b64
    )
    return decode_key(read_secret(path), str(path))


# ---- rendering ----


def _timestamp(value: Any) -> str:
    """A protobuf Timestamp or microseconds since the epoch, as UTC text."""
    if hasattr(value, "seconds"):
        if not value.seconds and not value.nanos:
            return ""
        seconds = value.seconds + value.nanos / 1e9
    elif isinstance(value, int):
        seconds = value / 1e6
    else:
        return ""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _money(value: Any) -> str:
    if value is None or not getattr(value, "currency", ""):
        return ""
    return format_minor(int(value.amount_minor), value.currency)


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["timestamp"] = _timestamp
    templates.env.filters["money"] = _money
    return templates


def render(
    request: Request,
    session: Session | None,
    template: str,
    context: dict[str, Any] | None = None,
    status: int = 200,
) -> Response:
    """A page: `template` extending base.html, with the session, the pages
    it may see (navigation) and its CSRF token."""
    console = console_of(request)
    nav = [page for page in console.pages if session is not None and session.can(page.permission)]
    full = {"session": session, "nav": nav, "csrf_field": CSRF_FIELD, **(context or {})}
    return console.templates.TemplateResponse(request, template, full, status_code=status)


def error_page(
    request: Request,
    session: Session | None,
    status: int,
    reason: str,
    message: str,
    field_name: str = "",
) -> Response:
    """An error a person reads, with its machine-readable reason (and the
    field at fault) in the page and in the `X-Triplane-Reason` header."""
    response = render(
        request,
        session,
        "error.html",
        {"status": status, "reason": reason, "message": message, "field": field_name},
        status=status,
    )
    response.headers["X-Triplane-Reason"] = reason
    if field_name:
        response.headers["X-Triplane-Field"] = field_name
    return response


def grpc_error_page(
    request: Request, session: Session | None, error: grpc.aio.AioRpcError
) -> Response:
    """A plane's refusal, passed on with its reason and field."""
    reason, field_name = parse_rpc_error(error)
    status = HTTP_STATUS.get(error.code(), 502)
    return error_page(
        request,
        session,
        status,
        reason or error.code().name,
        error.details() or "The plane refused the call.",
        field_name,
    )


def safe_next(target: str) -> str:
    """A redirect target after sign-in: a path on this console, never another site."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def set_session_cookie(console: Console, response: Response, session_id: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(console.config.console.session_absolute_s),
        httponly=True,
        samesite="lax",
        secure=console.secure_cookies,
        path="/",
    )


async def start_session(
    request: Request, username: str, roles: tuple[str, ...], target: str
) -> Response:
    """A new session (a fresh id: never one the browser brought) and the
    redirect to `target`."""
    console = console_of(request)
    old = request.cookies.get(SESSION_COOKIE, "")
    if old:
        await asyncio.to_thread(console.store.delete_session, old)
    session_id = new_session_id()
    await asyncio.to_thread(
        console.store.create_session, session_id, username, roles, console.clock.now_us()
    )
    session = Session(session_id, username, roles, csrf_token(console.session_key, session_id))
    await audit.record(request, session, "login", username, "ok", after={"roles": list(roles)})
    response = RedirectResponse(safe_next(target), 303)
    set_session_cookie(console, response, session_id)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


# ---- sign-in ----


def _login_form(request: Request, message: str = "", status: int = 200) -> Response:
    console = console_of(request)
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    response = render(
        request,
        None,
        "login.html",
        {
            "login_csrf": csrf_token(console.session_key, nonce),
            "next": safe_next(request.query_params.get("next", "/")),
            "message": message,
            "oidc": console.oidc is not None,
        },
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_COOKIE_MAX_AGE_S,
        httponly=True,
        samesite="lax",
        secure=console.secure_cookies,
        path="/",
    )
    return response


async def login_page(request: Request) -> Response:
    console = console_of(request)
    if await current_session(console, request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next", "/")), 303)
    return _login_form(request)


async def login_submit(request: Request) -> Response:
    console = console_of(request)
    form = await request.form()
    username = str(form.get("username", "")).strip()
    password = str(form.get("password", ""))
    target = str(form.get("next", "/"))
    if not csrf_ok(
        console.session_key, request.cookies.get(LOGIN_COOKIE, ""), str(form.get(CSRF_FIELD, ""))
    ):
        # Audited apart from refused passwords: a forged post must not
        # count towards a name's sign-in throttle.
        await audit.record(request, None, "csrf.refused", "/login", "denied", actor=username)
        return error_page(
            request, None, 403, "CSRF_TOKEN_INVALID", "The sign-in form expired; load it again."
        )
    if console.oidc is not None:
        return error_page(
            request, None, 400, "LOCAL_ACCOUNTS_OFF", "Sign in through the identity provider."
        )
    settings = console.config.console
    if settings.login_max_failures and username:
        since = console.clock.now_us() - int(settings.login_failure_window_s * 1_000_000)
        failures = await asyncio.to_thread(console.store.failed_logins, username, since)
        if failures >= settings.login_max_failures:
            await audit.record(
                request,
                None,
                "login",
                username,
                "denied",
                actor=username,
                after={"reason": "LOGIN_THROTTLED"},
            )
            return error_page(
                request,
                None,
                429,
                "LOGIN_THROTTLED",
                "Too many refused sign-ins for this name; wait and try again.",
                "username",
            )
    user = await asyncio.to_thread(console.store.user, username) if username else None
    ok = await asyncio.to_thread(verify_password, user.password_hash if user else None, password)
    if user is None or not ok:
        await audit.record(
            request,
            None,
            "login",
            username,
            "denied",
            actor=username,
            after={"reason": "BAD_CREDENTIALS"},
        )
        return _login_form(request, "Wrong username or password.", status=401)
    return await start_session(request, user.username, user.roles, target)


async def logout(request: Request) -> Response:
    console = console_of(request)
    session = await current_session(console, request)
    if session is not None:
        form = await request.form()
        presented = request.headers.get("x-csrf-token") or str(form.get(CSRF_FIELD, ""))
        if not csrf_ok(console.session_key, session.session_id, presented):
            return error_page(request, session, 403, "CSRF_TOKEN_INVALID", "Reload and retry.")
        await asyncio.to_thread(console.store.delete_session, session.session_id)
        await audit.record(request, session, "logout", session.username, "ok")
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def home(request: Request) -> Response:
    console = console_of(request)
    session = await current_session(console, request)
    if session is None:
        return RedirectResponse("/login", 303)
    for page in console.pages:
        if session.can(page.permission):
            return RedirectResponse(page.path, 303)
    return render(request, session, "home.html")


async def sweep_sessions(console: Console) -> int:
    """Deletes the sessions that have expired (idle or absolute); returns how many."""
    now = console.clock.now_us()
    settings = console.config.console
    return await asyncio.to_thread(
        console.store.delete_sessions_before,
        now - int(settings.session_idle_s * 1_000_000),
        now - int(settings.session_absolute_s * 1_000_000),
    )


async def healthz(request: Request) -> Response:
    console = console_of(request)
    try:
        await asyncio.to_thread(console.store.db.read_one, "SELECT 1")
    except Exception as error:  # the store is what the console needs to serve
        log.warning("health: store unavailable: %s", error)
        return PlainTextResponse("store unavailable", 503)
    return PlainTextResponse("ok")


async def _headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if not request.url.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def create_app(
    config: Config,
    *,
    clock: Clock | None = None,
    store: ConsoleStore | None = None,
    planes: Planes | None = None,
    oidc: Oidc | None = None,
) -> Starlette:
    """The console for `config`. Tests inject a ManualClock (session expiry
    without sleeping), a store or the planes' channels."""
    settings = config.console
    public_url = settings.public_url or f"http://{settings.listen}"
    if oidc is None and settings.oidc.issuer:
        oidc = Oidc(settings.oidc, public_url)
    pages = discover()
    console = Console(
        config=config,
        store=store or ConsoleStore.from_config(config),
        planes=planes or Planes(config),
        clock=clock or SystemClock(),
        session_key=load_session_key(config),
        templates=make_templates(),
        pages=pages,
        oidc=oidc,
        secure_cookies=public_url.startswith("https://"),
        public_url=public_url,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweep = asyncio.create_task(
            every(
                settings.session_sweep_interval_s,
                lambda: sweep_sessions(console),
                "console session sweep",
            ),
            name="console-session-sweep",
        )
        try:
            yield
        finally:
            await cancel_and_wait([sweep])
            await console.planes.close()
            if console.oidc is not None:
                await console.oidc.close()
            console.store.close()

    routes: list[BaseRoute] = [
        Route("/", home),
        Route("/healthz", healthz),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        *(oidc.routes() if oidc is not None else []),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    for page in pages:
        routes.extend(page.routes)
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_headers)],
        lifespan=lifespan,
    )
    app.state.console = console
    return app
