"""Console replicas share accounts, sessions and the audit log through
PostgreSQL: a session made on one replica is good on the other (its CSRF
token too: both derive it from the same session key), signing out on one
ends it on both, and both write one audit log."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from console.app import create_app
from console.auth import SESSION_COOKIE, hash_password
from console.store import ConsoleStore, UserExists
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config

pytestmark = pytest.mark.postgres

PASSWORD = "a long replica password"


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str) -> Config:
    key = tmp_path / "session-key"
    key.write_text("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")  # 32 bytes, base64
    return load_config(
        environ={"TRIPLANE_CONSOLE_DSN": pg_dsn},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "console": {"session_key_file": str(key)},
        },
    )


@pytest.fixture
def replicas(config: Config) -> Iterator[tuple[TestClient, TestClient]]:
    clock = ManualClock()
    first_store = ConsoleStore.from_config(config)
    assert first_store.db.dialect == "postgres"
    first_store.add_user("rita", hash_password(PASSWORD), ["reviewer"], clock.now_us())
    first_store.add_user("aldo", hash_password(PASSWORD), ["auditor"], clock.now_us())
    with pytest.raises(UserExists):
        first_store.add_user("rita", hash_password(PASSWORD), ["auditor"], clock.now_us())
    one = create_app(config, clock=clock, store=first_store)
    two = create_app(config, clock=clock, store=ConsoleStore.from_config(config))
    with (
        TestClient(one, follow_redirects=False) as a,
        TestClient(two, follow_redirects=False) as b,
    ):
        yield a, b


def test_a_session_is_good_on_every_replica(replicas: tuple[TestClient, TestClient]) -> None:
    a, b = replicas
    form = a.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token
    signed = a.post(
        "/login", data={"username": "aldo", "password": PASSWORD, "csrf_token": token.group(1)}
    )
    assert signed.status_code == 303
    session = a.cookies.get(SESSION_COOKIE) or ""
    b.cookies.set(SESSION_COOKIE, session)
    page = b.get("/audit")
    assert page.status_code == 200 and 'data-testid="username">aldo<' in page.text
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert csrf
    # Signed out on b, with the token a's page carried: gone on a as well.
    assert b.post("/logout", data={"csrf_token": csrf.group(1)}).status_code == 303
    assert a.get("/audit").status_code == 303
    store: ConsoleStore = a.app.state.console.store  # type: ignore[attr-defined]
    actions = [(e.actor, e.action, e.outcome) for e in store.audit_entries(10)]
    assert actions == [("aldo", "logout", "ok"), ("aldo", "login", "ok")]
