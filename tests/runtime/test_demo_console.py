"""`make demo`'s console accounts and page check (triplane_tools/demo_console):
one account per role with a random password in a new 0600 file (never
overwritten), each password the store accepts; signing in over HTTP as a
browser does and fetching every page a role may read, a page that does not
answer 200 (here: its plane is not running) and a refused sign-in counted as
failures naming the role and the page. A console (uvicorn, HTTP) with no
plane behind it; tests/console/test_demo_console.py has one with the policy
plane running."""

from __future__ import annotations

import asyncio
import stat
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from console.app import create_app
from console.auth import ROLES, verify_password
from console.store import ConsoleStore
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane_tools import demo_console
from triplane_tools.demo_console import Account, create_accounts, read_accounts_file

START_WITHIN_S = 30.0


@dataclass
class RunningConsole:
    url: str
    store: ConsoleStore


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own
        pass


@pytest.fixture
async def running_console(tmp_path: Path) -> AsyncIterator[RunningConsole]:
    """The console over HTTP; every plane's address a free port nothing
    listens on, so a page that calls a plane does not answer 200."""
    port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "policy": {"listen": f"127.0.0.1:{free_port()}"},
            "money": {"listen": f"127.0.0.1:{free_port()}"},
            "ai": {"listen": f"127.0.0.1:{free_port()}"},
            "console": {"listen": f"127.0.0.1:{port}", "plane_timeout_s": 2.0},
        },
    )
    store = ConsoleStore.from_config(config)
    app = create_app(config, clock=ManualClock(time.time_ns() // 1000), store=store)
    server = _Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_WITHIN_S
    while not server.started:
        assert thread.is_alive(), "the console exited while starting"
        assert time.monotonic() < deadline, "the console did not start"
        await asyncio.sleep(0.05)
    try:
        yield RunningConsole(f"http://127.0.0.1:{port}", store)
    finally:
        server.should_exit = True
        thread.join(START_WITHIN_S)


async def test_one_account_per_role_in_a_new_owner_only_file(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"runtime": {"state_dir": str(tmp_path)}})
    store = ConsoleStore.from_config(config)
    path = tmp_path / demo_console.ACCOUNTS_FILE
    try:
        accounts = await create_accounts(store, path, 1_000_000)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_accounts_file(path) == accounts
        assert [a.role for a in accounts] == list(ROLES)
        assert len({a.password for a in accounts}) == len(ROLES)
        assert all(len(a.password) >= 32 for a in accounts)
        for account in accounts:
            user = store.user(account.username)
            assert user is not None and user.roles == (account.role,)
            assert verify_password(user.password_hash, account.password)
            assert account.password not in user.password_hash
        # A second demo in the same state dir never overwrites the file.
        with pytest.raises(FileExistsError):
            await create_accounts(store, path, 2_000_000)
        assert read_accounts_file(path) == accounts
    finally:
        store.close()


def test_each_role_reads_the_pages_its_permissions_name() -> None:
    assert demo_console.readable_paths("reviewer") == ["/cases", "/decisions", "/bundles"]
    assert "/ledger" in demo_console.readable_paths("finance_operator")
    assert "/cases" not in demo_console.readable_paths("finance_operator")
    assert "/audit" in demo_console.readable_paths("auditor")


async def test_pages_that_do_not_answer_200_fail_the_check(
    running_console: RunningConsole, tmp_path: Path
) -> None:
    accounts = await create_accounts(
        running_console.store, tmp_path / "accounts.txt", 1_000_000, roles=["auditor", "sre"]
    )
    wrong = Account("demo-intruder", "reviewer", "not the password of anyone")
    report = await demo_console.check_pages(running_console.url, [*accounts, wrong], "demo")

    statuses = {(c.role, c.path): c.status for c in report.checks}
    # Pages served by the console alone answer; those whose plane is down do not.
    assert statuses[("auditor", "/audit")] == 200
    assert statuses[("auditor", "/experiments")] == 200
    assert statuses[("auditor", "/cases")] != 200
    assert statuses[("sre", "/models")] != 200
    assert {c.path for c in report.checks if c.role == "auditor"} == set(
        demo_console.readable_paths("auditor")
    )
    # The wrong password is one failed sign-in, no page fetched for it.
    refused = [c for c in report.checks if c.role == "reviewer"]
    assert [(c.path, c.status) for c in refused] == [("/login", 401)]
    failures = report.failures()
    assert "console: reviewer got 401 from /login" in failures
    assert any(f.startswith("console: auditor got 50") and "/cases" in f for f in failures)
    assert "console: auditor got 200" not in " ".join(failures)
    summary = report.summary()
    ok = sum(c.status == 200 for c in report.checks)
    assert summary.startswith(f"console           {ok}/{len(report.checks)} pages answered 200")
    assert all(a.password not in summary for a in accounts)
