"""The chaos run, short (`make chaos` runs the full one): `triplane chaos
--schedule short` as a user runs it, on its own private PostgreSQL (killed
-9 and started again during the run), a 3-node JetStream cluster (a node
restarted) and the machine's Redis, with 2 replicas of the money, policy and
gateway planes and one AI plane. Under a mixed workload through the gateway,
the money, policy and gateway planes are each killed -9 once and restarted,
Triton is stopped (SIGSTOP) for a few seconds, the money stream's leader is
restarted, PostgreSQL is killed. Afterwards: nothing acknowledged lost, nothing duplicated, no
INTERNAL, no answer past its deadline, every fault recovered from, and every
other check of the run (the ledger balances, decision logs verify) passes.

It runs as a child process because the command must start with gRPC's fork
handlers off (triplane_tools.chaos.FORK_SUPPORT_ENV), which a test process
that has imported grpc can no longer turn off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _loud_skip
from triplane.runtime.lifetime import die_with_parent
from triplane_tools.chaos import FORK_SUPPORT_ENV
from triplane_tools.chaos_engines import PostgresUnavailable, find_binaries
from triplane_tools.natsd import find_binary

pytestmark = [pytest.mark.postgres, pytest.mark.nats, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
# A bound on the run, never a measurement: it takes about two minutes here.
RUN_TIMEOUT_S = 540


def test_short_chaos_run_loses_nothing_duplicates_nothing_and_answers_in_time(
    tmp_path: Path, redis_url: str
) -> None:
    try:
        find_binaries()
        find_binary()
    except (PostgresUnavailable, FileNotFoundError) as missing:
        _loud_skip("chaos run", str(missing))
    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE_")}
    env[FORK_SUPPORT_ENV] = "false"
    command = [
        sys.executable,
        "-m",
        "triplane_tools.cli",
        "chaos",
        "--schedule",
        "short",
        "--duration-s",
        "5",
        "--workers",
        "4",
        "--ai-replicas",
        "1",
        # The AI plane's kill is left out here (its restart, Triton and its
        # models loaded again, takes half a minute on two cores); make chaos
        # kills both AI replicas in turn. Its Triton is still stopped.
        "--faults",
        "money,policy,gateway,triton,nats,postgres",
        "--customers",
        "20",
        "--warmup-s",
        "2",
        "--fault-gap-s",
        "1",
        "--triton-stop-s",
        "3",
        "--state-dir",
        str(tmp_path / "state"),
        "--results",
        str(results),
    ]
    run = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        preexec_fn=die_with_parent(),
        check=False,
    )
    report = run.stdout[-6000:] + "\n" + run.stderr[-3000:]
    assert results.exists(), report
    figures = json.loads(results.read_text())
    # Money, policy and gateway killed once each, Triton stopped, a JetStream node and
    # PostgreSQL restarted; work was done and acknowledged under them.
    assert figures["chaos_faults_injected_total"] == 6, report
    assert figures["chaos_faults_unrecovered_total"] == 0, report
    assert figures["chaos_acknowledged_total"] > 0, report
    assert figures["chaos_acknowledged_lost_total"] == 0, report
    assert figures["chaos_duplicated_total"] == 0, report
    assert figures["chaos_internal_total"] == 0, report
    assert figures["chaos_late_answers_total"] == 0, report
    assert figures["chaos_check_failures_total"] == 0, report
    assert figures["chaos_retries_refused_total"] == 0, report
    assert run.returncode == 0, report
    assert "verdict: PASS" in run.stdout, report
