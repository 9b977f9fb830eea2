"""Helpers of the engagement tests (delivery, triggers, measurement): a real
HTTP receiver on 127.0.0.1, config builders and databases on each backend."""

from __future__ import annotations

import asyncio
import atexit
import base64
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from triplane.runtime.config import Config, DeliveryConfig, load_config
from triplane.runtime.db import Database
from triplane.runtime.retry import RetryPolicy

SECRET = "whsec_" + base64.b64encode(b"triplane-test-secret-0123456789ab").decode()
_SECRET_DIR: list[Path] = []


def secret_file() -> str:
    """A file holding SECRET (config names webhook secrets by their file,
    as a mounted Kubernetes Secret), made once per test process."""
    if not _SECRET_DIR:
        directory = Path(tempfile.mkdtemp(prefix="triplane-test-secrets-"))
        atexit.register(shutil.rmtree, directory, True)
        (directory / "webhook.secret").write_text(SECRET + "\n")
        _SECRET_DIR.append(directory)
    return str(_SECRET_DIR[0] / "webhook.secret")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str


@dataclass
class Receiver:
    """An HTTP endpoint whose answers a test scripts: each request takes the
    next planned (status, delay_s) and falls back to `default` when none is left."""

    url: str = ""
    default: tuple[int, float] = (200, 0.0)
    plan: list[tuple[int, float]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    decide: Callable[[Received], int] | None = None

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.received]

    def acknowledged_ids(self) -> set[str]:
        return {
            r.headers["webhook-id"]
            for r, status in zip(self.received, self.answered, strict=False)
            if 200 <= status < 300
        }

    async def handle(self, request: web.Request) -> web.Response:
        item = Received(
            request.path, {k.lower(): v for k, v in request.headers.items()}, await request.text()
        )
        self.received.append(item)
        status, delay_s = self.plan.pop(0) if self.plan else self.default
        if self.decide is not None:
            status = self.decide(item)
        if delay_s:
            await asyncio.sleep(delay_s)
        self.answered.append(status)
        return web.Response(status=status, text="ok" if status < 300 else "no")


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    """Starts a receiver on a free port and always stops it."""
    state = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", state.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def base_config(state_dir: Path, gateway: dict[str, Any] | None = None) -> Config:
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "gateway": gateway or {},
        },
    )


def delivery_config(retry: dict[str, Any] | None = None, **changes: Any) -> DeliveryConfig:
    """The shipped delivery config with test-sized bounds; `retry` changes keys
    of its retry policy (gateway.delivery.retry)."""
    policy: dict[str, Any] = {
        "initial_interval_s": 1.0,
        "backoff_coefficient": 2.0,
        "maximum_interval_s": 30.0,
        "maximum_attempts": 4,
        "jitter_s": 0.5,
        **(retry or {}),
    }
    defaults: dict[str, Any] = {
        "retry": RetryPolicy(**policy),
        "request_timeout_s": 0.5,
        "lease_s": 5.0,
        "poll_interval_s": 0.05,
    }
    config = load_config(environ={}).gateway.delivery
    return msgspec.structs.replace(config, **{**defaults, **changes})


def open_db(backend: str, state_dir: Path, pg_dsn: str = "") -> Database:
    if backend == "postgres":
        return Database("postgres", pg_dsn)
    return Database("sqlite", str(state_dir / "engagement.db"))
