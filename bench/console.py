"""Operator console benchmark: `python -m bench.console` (`make bench ONLY=console`).

Measures, on this machine, the time from request to the whole page for the
console's busiest pages, on a policy plane holding 100,000 logged decisions
of one tenant of which 10,000 opened review cases:
- console_case_queue_render_ms_p95: the review queue (`/cases?tenant=..`, the
  open cases, oldest first, one page);
- console_decision_search_render_ms_p95: the decision search
  (`/decisions?tenant=..`, newest first, one page, and by customer);
- console_decision_page_render_ms_p95: one decision (`/decisions/<tenant>/<id>`,
  ids drawn at random among the 100,000);
- console_page_render_ms_p95: all of the above together (target <= 300 ms).

The plane is real (gRPC over mutual TLS, SQLite store, the shipped bundle);
its decisions are seeded through its own engine (`PolicyEngine.evaluate`,
group-committed as under load: the plane's code, not rows written beside
it). The console runs under uvicorn in this process; the pages are fetched
over HTTP by a signed-in reviewer, one at a time.
"""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from bench.common import merge_results, percentile, print_table
from console.app import create_app
from console.auth import hash_password
from console.store import ConsoleStore
from policy_plane.app import build_plane
from policy_plane.model import EvaluationInput, Party, PaymentInput, ScoreInput, SnapshotInput
from policy_plane.profiles import CustomerProfile
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane_tools.certs import ensure_dev_certificates

TENANT = "bench-console"
DECISIONS = 100_000
# Every tenth payment scores above the shipped bundle's score_review: a case.
CASE_EVERY = 10
CUSTOMERS = 1_000
SEED_BATCH = 500
SAMPLES = 200
WARMUP = 10
TARGET_MS = 300.0
DAY_US = 86_400_000_000
PASSWORD = "bench console password"
START_WITHIN_S = 30.0


def payment(index: int) -> EvaluationInput:
    customer = index % CUSTOMERS
    review = index % CASE_EVERY == 0
    return EvaluationInput(
        tenant_id=TENANT,
        idempotency_key=f"console-bench-{index}",
        payment=PaymentInput(
            account_id=f"acct-{customer}",
            credit_account_id=f"merchant-{index % 50}",
            kind="purchase",
            amount_minor=1_000 + index % 9_000,
            currency="USD",
            merchant_id=f"m-{index % 50}",
            merchant_category="5411",
            customer=Party(name="Jane Example", country="US"),
            counterparty=Party(name="Corner Shop", country="US"),
            customer_id=f"cust-{customer}",
        ),
        snapshot=SnapshotInput(
            score=ScoreInput(
                model="payment_risk",
                version="3",
                source="triton",
                score=0.8 if review else 0.1,
            ),
        ),
    )


async def seed(plane: object) -> tuple[list[str], int]:
    """DECISIONS decisions through the engine; (their ids, the cases opened)."""
    engine = plane.engine  # type: ignore[attr-defined]
    await engine.create_tenant(TENANT, "Console bench")
    opened_us = int(time.time() * 1e6) - 400 * DAY_US
    for customer in range(CUSTOMERS):
        await engine.put_customer_profile(
            CustomerProfile(
                tenant_id=TENANT,
                customer_id=f"cust-{customer}",
                kyc_tier=2,
                country="US",
                account_opened_at_us=opened_us,
                verified_at_us=opened_us,
            ),
            f"kyc-{customer}",
            "bench",
        )
    ids: list[str] = []
    cases = 0
    for start in range(0, DECISIONS, SEED_BATCH):
        answers = await asyncio.gather(
            *(engine.evaluate(payment(i)) for i in range(start, min(DECISIONS, start + SEED_BATCH)))
        )
        for decision, _ in answers:
            ids.append(decision.record.decision_id)
            cases += bool(decision.record.case_id)
    return ids, cases


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the bench process keeps its own
        pass


def sign_in(client: httpx.Client, username: str) -> None:
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token, form.text
    answer = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": token.group(1)},
    )
    assert answer.status_code == 303, answer.text


def timed(client: httpx.Client, paths: list[str]) -> list[float]:
    """Milliseconds from request to the whole page, each path in turn."""
    samples: list[float] = []
    for path in paths:
        started = time.perf_counter()
        answer = client.get(path)
        elapsed = (time.perf_counter() - started) * 1000.0
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        samples.append(elapsed)
    return samples


async def run(state_dir: Path) -> dict[str, float | int]:
    console_port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_level": "WARNING"},
            "nats": {"url": ""},
            "policy": {"listen": f"127.0.0.1:{free_port()}"},
            "console": {"listen": f"127.0.0.1:{console_port}"},
        },
    )
    ensure_dev_certificates(state_dir, config.runtime.tls)
    plane = build_plane(config)
    await plane.start()
    results: dict[str, float | int] = {}
    try:
        started = time.monotonic()
        ids, cases = await seed(plane)
        seeded_s = time.monotonic() - started
        print(f"seeded {len(ids):,} decisions ({cases:,} cases) in {seeded_s:.0f} s", flush=True)
        store = ConsoleStore.from_config(config)
        store.add_user("rita", hash_password(PASSWORD), ["reviewer"], int(time.time() * 1e6))
        server = _Server(
            uvicorn.Config(
                create_app(config, store=store),
                host="127.0.0.1",
                port=console_port,
                log_config=None,
                access_log=False,
                lifespan="on",
            )
        )
        thread = threading.Thread(target=server.run, name="console", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_WITHIN_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "console did not start"
            await asyncio.sleep(0.05)
        try:
            results = await asyncio.to_thread(measure, console_port, ids, cases, seeded_s)
        finally:
            server.should_exit = True
            await asyncio.to_thread(thread.join, START_WITHIN_S)
    finally:
        await plane.stop()
    return results


def measure(port: int, ids: list[str], cases: int, seeded_s: float) -> dict[str, float | int]:
    rng = random.Random(15)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
        sign_in(client, "rita")
        queue = [f"/cases?tenant={TENANT}"] * SAMPLES
        search = [
            f"/decisions?tenant={TENANT}"
            if i % 2 == 0
            else f"/decisions?tenant={TENANT}&customer=cust-{rng.randrange(CUSTOMERS)}"
            for i in range(SAMPLES)
        ]
        pages = [f"/decisions/{TENANT}/{rng.choice(ids)}" for _ in range(SAMPLES)]
        first = timed(client, [queue[0], search[0], pages[0]])
        timed(client, queue[:WARMUP] + search[:WARMUP] + pages[:WARMUP])
        measured = {"case_queue": timed(client, queue), "decision_search": timed(client, search)}
        measured["decision_page"] = timed(client, pages)
    everything = [ms for samples in measured.values() for ms in samples]
    results: dict[str, float | int] = {
        f"console_{name}_render_ms_p95": percentile(samples, 95)
        for name, samples in measured.items()
    }
    results.update(
        {
            f"console_{name}_render_ms_p50": percentile(samples, 50)
            for name, samples in measured.items()
        }
    )
    results["console_page_render_ms_p95"] = percentile(everything, 95)
    results["console_first_page_render_ms_max"] = max(first)
    results["console_bench_decisions"] = len(ids)
    results["console_bench_cases"] = cases
    results["console_bench_seed_s"] = seeded_s
    return results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="triplane-bench-console-") as tmp:
        results = asyncio.run(run(Path(tmp)))
    merge_results(results)
    target = f"<= {TARGET_MS:.0f} ms"
    print_table(
        f"console ({results['console_bench_decisions']:,} decisions, "
        f"{results['console_bench_cases']:,} cases)",
        [
            ("console_page_render_ms_p95", results["console_page_render_ms_p95"], target),
            ("console_case_queue_render_ms_p95", results["console_case_queue_render_ms_p95"], ""),
            (
                "console_decision_search_render_ms_p95",
                results["console_decision_search_render_ms_p95"],
                "",
            ),
            (
                "console_decision_page_render_ms_p95",
                results["console_decision_page_render_ms_p95"],
                "",
            ),
            ("console_first_page_render_ms_max", results["console_first_page_render_ms_max"], ""),
            ("console_bench_seed_s", results["console_bench_seed_s"], "seeding, not measured"),
        ],
    )
    return 0 if results["console_page_render_ms_p95"] <= TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
