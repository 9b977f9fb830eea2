"""`triplane policy ...` subcommands and `python -m policy_plane`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_plane import cli
from policy_plane.bundle import shipped_default_path
from triplane.runtime.clock import ManualClock
from triplane.runtime.net import free_port

from ..tls_helpers import channel_as, dev_certificates
from .conftest import make_config, payment_input, started_engine


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="triplane")
    parser.add_argument("--config", default=None)
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def cli_env(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRIPLANE_STATE_DIR", str(state_dir))
    monkeypatch.delenv("TRIPLANE_CONFIG", raising=False)
    dev_certificates(state_dir)  # as the dev stack makes them: mutual TLS is on
    return state_dir


async def test_verify_log_and_replay_commands(
    cli_env: Path,
    clock: ManualClock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = await started_engine(make_config(cli_env), clock)
    for index in range(5):
        await engine.evaluate(payment_input(f"cli-{index}", amount_minor=1_000 + index))
    await engine.stop()
    engine.store.db.close()

    assert await asyncio.to_thread(run_cli, ["policy", "verify-log"]) == 0
    assert json.loads(capsys.readouterr().out)["records_checked"] == 5
    assert await asyncio.to_thread(run_cli, ["policy", "replay", "--tenant", "acme"]) == 0
    serial = json.loads(capsys.readouterr().out)
    assert serial["determinism_score"] == 1.0 and serial["decisions_replayed"] == 5
    # Pages of 2, workers from the second page on: the same report.
    monkeypatch.setenv("TRIPLANE__POLICY__DECISION_LOG__REPLAY_PAGE_RECORDS", "2")
    monkeypatch.setenv("TRIPLANE__POLICY__DECISION_LOG__REPLAY_PARALLEL_MIN_DECISIONS", "1")
    command = ["policy", "replay", "--tenant", "acme", "--workers", "2"]
    assert await asyncio.to_thread(run_cli, command) == 0
    parallel = json.loads(capsys.readouterr().out)
    assert {**parallel, "elapsed_s": 0} == {**serial, "elapsed_s": 0}

    with engine.store.db.__class__("sqlite", str(cli_env / "policy.db")).tx() as tx:
        tx.execute("DELETE FROM decision_log WHERE seq = 3")
    assert await asyncio.to_thread(run_cli, ["policy", "verify-log"]) == 1
    assert json.loads(capsys.readouterr().out)["problem"] == "RECORD_MISSING"


async def test_verify_log_covers_every_writers_chain(
    cli_env: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log written as one chain, then by a writer with a chain of its own
    (policy.decision_log.writer_id): verify-log checks both, --chain one."""
    for writer_id, prefix in (("", "one"), ("pod-a", "a")):
        engine = await started_engine(
            make_config(cli_env, decision_log={"writer_id": writer_id}), clock
        )
        for index in range(3):
            await engine.evaluate(payment_input(f"{prefix}-{index}", amount_minor=1_000 + index))
        await engine.stop()
        engine.store.db.close()

    assert await asyncio.to_thread(run_cli, ["policy", "verify-log"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["chains"], result["records_checked"]) == (["main", "main-pod-a"], 6)
    assert await asyncio.to_thread(run_cli, ["policy", "verify-log", "--chain", "main-pod-a"]) == 0
    assert json.loads(capsys.readouterr().out)["records_checked"] == 3

    with engine.store.db.__class__("sqlite", str(cli_env / "policy.db")).tx() as tx:
        tx.execute("DELETE FROM decision_log WHERE chain_id = 'main-pod-a' AND seq = 3")
    assert await asyncio.to_thread(run_cli, ["policy", "verify-log"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["problem"] == "RECORD_MISSING" and "main-pod-a" in result["detail"]


def test_load_bundle_check_refuses_a_bad_file(
    cli_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(shipped_default_path().read_text())
    assert run_cli(["policy", "load-bundle", str(good), "--via", "check", "--label", "cli"]) == 0
    assert json.loads(capsys.readouterr().out)["version"].startswith("cli@")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        shipped_default_path().read_text().replace("limits.known &&", "limits.knwn &&", 1)
    )
    assert run_cli(["policy", "load-bundle", str(bad), "--via", "check"]) == 2
    assert "RULE_UNKNOWN_FIELD" in capsys.readouterr().err


async def test_python_m_policy_plane_serves_until_sigterm(cli_env: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TRIPLANE_STATE_DIR": str(cli_env),
        "TRIPLANE__POLICY__LISTEN": f"127.0.0.1:{port}",
        "TRIPLANE__NATS__URL": "",
        "TRIPLANE__RUNTIME__LOG_FORMAT": "text",
    }
    env.pop("NATS_URL", None)
    process = subprocess.Popen(  # noqa: ASYNC220 - a child we keep, not a blocking call
        [sys.executable, "-m", "policy_plane"],
        env=env,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        async with channel_as(cli_env, f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            for _ in range(100):
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service="triplane.policy.v1.PolicyService"),
                        timeout=1,
                    )
                    status = reply.status
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
