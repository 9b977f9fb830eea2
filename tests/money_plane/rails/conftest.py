"""The sandbox bank as a real process on a free port, with a manual clock
(moved over HTTP: "returned days later" without waiting), and rail adapters
pointed at it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sandbox_helpers import BankClient

from triplane.runtime.net import free_port, port_open

START_TIMEOUT_S = 30.0  # a bound on a wait, not a timing assertion


def start_bank(tmp: Path, **sandbox: Any) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    section = {
        "listen": f"127.0.0.1:{port}",
        "clock": "manual",
        # A Monday, 14:00 UTC (09:00 New York): ACH same-day windows open.
        "manual_start": "2026-12-07T14:00:00+00:00",
        "seed": 7,
        "faults": {
            "reject_rate": 0.0,
            "return_rate": 0.0,
            "duplicate_rate": 0.0,
            "late_rate": 0.0,
            "amount_change_rate": 0.0,
            "batch_rate": 0.0,
        },
    }
    faults = sandbox.pop("faults", {})
    section.update(sandbox)
    section["faults"].update(faults)  # type: ignore[attr-defined]
    path = tmp / f"bank-{port}.yaml"
    path.write_text(yaml.safe_dump({"sandbox_bank": section}))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TRIPLANE_") or k == "TRIPLANE_SUPERVISOR_PID"
    }
    env["TRIPLANE_CONFIG"] = str(path)
    log = (tmp / f"bank-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "triplane_sim.sandbox_bank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).resolve().parents[3],
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((tmp / f"bank-{port}.log").read_text())
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def stop_bank(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def bank_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., str]]:
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tmp_path_factory.mktemp("bank")

    def make(**sandbox: Any) -> str:
        proc, url = start_bank(tmp, **sandbox)
        procs.append(proc)
        return url

    yield make
    for proc in procs:
        stop_bank(proc)


@pytest.fixture(scope="module")
def clean_bank(bank_factory: Callable[..., str]) -> str:
    """No faults."""
    return bank_factory()


@pytest.fixture
async def client(clean_bank: str) -> AsyncIterator[BankClient]:
    c = BankClient(clean_bank)
    yield c
    await c.aclose()
