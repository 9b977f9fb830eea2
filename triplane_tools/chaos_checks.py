"""What a chaos run checks afterwards, against the stores themselves (never
against what the planes say about them), and its report.

- the ledger balances (the money plane's CheckBalanced over the tenant);
- every acknowledged operation exists exactly once: its hold, capture entry,
  void or refund entry in the money plane's database, its decision in the
  decision log, its event in JetStream; no idempotency key made two holds or
  two entries; a call sent again with its key named the same effect;
- every event an outbox committed (money, policy, gateway) was published, and
  is in JetStream exactly once (by its Nats-Msg-Id); no message id is in a
  stream twice;
- every decision-log chain verifies (VerifyDecisionLog, each writer's chain);
- no answer was INTERNAL (or UNKNOWN);
- no answer came back later than its deadline plus the stated tolerance.

Figures: chaos_faults_injected_total, chaos_acknowledged_lost_total,
chaos_duplicated_total, chaos_internal_total, chaos_late_answers_total (and
a few more that say what was measured).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gateway.core import stable_id
from gateway.nba import EXPOSURE_SCOPE
from money_plane.domain import Entry, Hold, HoldState
from money_plane.store.records import decode
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime import bus
from triplane.runtime.tls import open_channel
from triplane_client import LedgerAdminClient
from triplane_tools.chaos import INTERNAL_CODES, TENANT, ChaosOptions, FaultRecord, Ledger
from triplane_tools.stack import Stack

# Examples kept per check, for the report.
EXAMPLES_KEPT = 5
FETCH_BATCH = 500
STREAM_READ_TRIES = 20
STREAM_READ_RETRY_S = 1.0
SETTLE_POLL_S = 0.5
# Each outbox table: the query counting its events not yet published.
UNSENT_QUERIES = {
    "money": "SELECT count(*) FROM outbox WHERE sent_at_us IS NULL",
    "policy": "SELECT count(*) FROM policy_outbox WHERE published = 0",
    "gateway": "SELECT count(*) FROM outbox WHERE sent_at_us IS NULL",
}
EVENT_QUERIES = {
    "money": "SELECT event_id FROM outbox",
    "policy": "SELECT event_id FROM policy_outbox",
    "gateway": "SELECT event_id FROM outbox",
}


@dataclass
class Check:
    """One property checked: how many things it looked at, how many broke it."""

    name: str
    expectation: str
    checked: int = 0
    lost: int = 0
    duplicated: int = 0
    failed: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, example: str) -> None:
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(example)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.failed)


@dataclass
class Report:
    faults: list[FaultRecord]
    checks: list[Check]
    calls: dict[str, collections.Counter[str]]
    answers_total: int
    internal: int
    late: int
    options: ChaosOptions
    ledger: Ledger

    @property
    def figures(self) -> dict[str, int]:
        acknowledged = sum(c["acknowledged"] for c in self.calls.values())
        return {
            "chaos_faults_injected_total": len(self.faults),
            "chaos_faults_unrecovered_total": sum(not f.ok for f in self.faults),
            "chaos_acknowledged_lost_total": sum(c.lost for c in self.checks),
            "chaos_duplicated_total": sum(c.duplicated for c in self.checks),
            "chaos_internal_total": self.internal,
            "chaos_late_answers_total": self.late,
            "chaos_calls_total": sum(sum(c.values()) for c in self.calls.values()),
            "chaos_acknowledged_total": acknowledged,
            "chaos_answers_total": self.answers_total,
            "chaos_check_failures_total": sum(c.failed for c in self.checks),
            # The workload never reuses a key for another request: a retry
            # refused as one (ALREADY_EXISTS) is a wrong answer.
            "chaos_retries_refused_total": sum(
                call.last_code == "ALREADY_EXISTS" for call in self.ledger.calls
            ),
        }

    @property
    def ok(self) -> bool:
        figures = self.figures
        return all(check.ok for check in self.checks) and not any(
            figures[key]
            for key in (
                "chaos_faults_unrecovered_total",
                "chaos_retries_refused_total",
                "chaos_internal_total",
                "chaos_late_answers_total",
            )
        )

    def table(self) -> str:
        lines = ["", "== chaos: faults injected =="]
        lines.append(f"{'at s':>7}  {'fault':<9} {'target':<28} {'back in s':>9}  result")
        for fault in self.faults:
            verdict = "ok" if fault.ok else "NOT RECOVERED"
            lines.append(
                f"{fault.at_s:>7.1f}  {fault.name:<9} {fault.target:<28} "
                f"{fault.recovered_s:>9.1f}  {verdict}: {fault.detail}"
            )
        lines += ["", "== chaos: calls through the gateway (final state of each) =="]
        for kind, counts in sorted(self.calls.items()):
            lines.append(f"{kind:<10} {sum(counts.values()):>6}  {dict(counts.most_common())}")
        unanswered = [call for call in self.ledger.calls if not call.acknowledged]
        for call in unanswered[:EXAMPLES_KEPT]:
            lines.append(
                f"    not acknowledged: {call.kind} {call.key}: {call.last_code} "
                f"{call.last_reason or '-'} after {call.attempts} attempts"
            )
        late_acks = sum(call.late_ack for call in self.ledger.calls)
        lines.append(
            f"acknowledged only when sent again after the workload: {late_acks}; answers "
            f"{self.answers_total} (deadline {self.options.deadline_s:.1f} s each, late past "
            f"+{self.options.late_tolerance_s:.1f} s)"
        )
        lines += ["", "== chaos: checks =="]
        lines.append(f"{'check':<44} {'checked':>8} {'lost':>5} {'dup':>5} {'bad':>5}  expected")
        for check in self.checks:
            lines.append(
                f"{check.name:<44} {check.checked:>8} {check.lost:>5} {check.duplicated:>5} "
                f"{check.failed:>5}  {check.expectation}"
            )
            lines += [f"    e.g. {example}" for example in check.examples]
        lines += ["", "== chaos: figures =="]
        lines += [f"{key:<34} {value:>8}" for key, value in self.figures.items()]
        phases = ", ".join(
            f"{name} {seconds:.0f} s" for name, seconds in self.ledger.phases_s.items()
        )
        lines.append(f"time: {phases}")
        lines.append(f"verdict: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def write_results(path: Path, values: Mapping[str, int | float | str]) -> None:
    """Merges the figures into a flat JSON results file (bench/results.json:
    bench.common.merge_results' format, which the tools may not import)."""
    current: dict[str, object] = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}
    current.update(values)
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def default_results_path() -> Path:
    override = os.environ.get("TRIPLANE_BENCH_RESULTS", "")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "bench" / "results.json"


# ---- the checks ----


async def check(stack: Stack, ledger: Ledger, options: ChaosOptions) -> Report:
    checks = [_faults_check(ledger)]
    checks.append(await _settle(stack, options))
    checks.append(await _ledger_balanced(stack))
    checks += await asyncio.to_thread(_money_checks, stack.config.money.store.postgres_dsn, ledger)
    dsns = _dsns(stack)
    checks.append(await asyncio.to_thread(_decision_check, dsns["policy"], dsns["gateway"], ledger))
    checks.append(_replay_check(ledger))
    streams = await stream_message_ids(stack)
    checks += await asyncio.to_thread(_event_checks, stack, ledger, streams)
    checks.append(await _decision_logs(stack))
    tolerance_s = options.late_tolerance_s
    internal = sum(answer.code in {c.name for c in INTERNAL_CODES} for answer in ledger.answers)
    late = sum(
        answer.code != "DEADLINE_EXCEEDED" and answer.elapsed_s > answer.deadline_s + tolerance_s
        for answer in ledger.answers
    )
    return Report(
        ledger.faults,
        checks,
        ledger.by_kind(),
        len(ledger.answers),
        internal,
        late,
        options,
        ledger,
    )


def _faults_check(ledger: Ledger) -> Check:
    found = Check("every fault injected and recovered from", "all back")
    for fault in ledger.faults:
        found.checked += 1
        if not fault.ok:
            found.failed += 1
            found.note(f"{fault.name} {fault.target}: {fault.detail}")
    return found


async def _settle(stack: Stack, options: ChaosOptions) -> Check:
    """Waits (bounded) until every outbox has published what it holds."""
    found = Check("outboxes drained after the run", "0 unsent")
    dsns = _dsns(stack)
    deadline = time.monotonic() + options.settle_timeout_s
    unsent: dict[str, int] = {}
    while True:
        unsent = await asyncio.to_thread(_unsent, dsns)
        if not any(unsent.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(SETTLE_POLL_S)
    found.checked = len(dsns)
    for plane, count in unsent.items():
        if count:
            found.lost += count
            found.note(f"{plane}: {count} events unsent {options.settle_timeout_s:.0f} s on")
    return found


def _dsns(stack: Stack) -> dict[str, str]:
    config = stack.config
    return {
        "money": config.money.store.postgres_dsn,
        "policy": config.policy.store.postgres_dsn,
        "gateway": config.gateway.store.postgres_dsn,
    }


def _unsent(dsns: Mapping[str, str]) -> dict[str, int]:
    counts = {}
    for plane, dsn in dsns.items():
        with psycopg.connect(dsn, connect_timeout=5) as connection:
            row = connection.execute(UNSENT_QUERIES[plane]).fetchone()
        counts[plane] = int(row[0]) if row else 0
    return counts


async def _ledger_balanced(stack: Stack) -> Check:
    found = Check("ledger balances (CheckBalanced)", "balanced")
    client = LedgerAdminClient(every_replica(stack, "money"), timeout_s=60, tls=stack.tls_files())
    try:
        answer = await client.check_balanced(TENANT)
    finally:
        await client.close()
    found.checked = int(answer.postings_checked)
    if not answer.balanced:
        found.failed = 1
        found.note(str(answer).replace("\n", " ")[:300])
    return found


def every_replica(stack: Stack, plane: str) -> str:
    """A target naming every replica of a plane (whichever is up answers)."""
    return "ipv4:" + ",".join(stack.replica_addresses[plane])


def _acknowledged(ledger: Ledger, kind: str) -> list[Any]:
    return [call.response for call in ledger.calls if call.kind == kind and call.acknowledged]


def _money_checks(dsn: str, ledger: Ledger) -> list[Check]:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        holds = [
            decode(bytes(row[0]), Hold)
            for row in connection.execute("SELECT body FROM holds WHERE tenant_id = %s", (TENANT,))
        ]
        entries = [
            decode(bytes(row[0]), Entry)
            for row in connection.execute(
                "SELECT body FROM entries WHERE tenant_id = %s", (TENANT,)
            )
        ]
    holds_by_id = {hold.hold_id: hold for hold in holds}
    entries_by_id = {entry.entry_id: entry for entry in entries}
    found = Check("acknowledged money ops exist (holds, entries)", "0 lost")
    for answer in _acknowledged(ledger, "authorize"):
        if answer.hold_id:
            found.checked += 1
            if answer.hold_id not in holds_by_id:
                found.lost += 1
                found.note(f"authorize: hold {answer.hold_id} not in the ledger")
    for answer in _acknowledged(ledger, "capture"):
        found.checked += 1
        hold = holds_by_id.get(answer.hold_id)
        if (
            hold is None
            or hold.state != HoldState.CAPTURED
            or hold.capture_entry_id != answer.entry_id
            or answer.entry_id not in entries_by_id
        ):
            found.lost += 1
            found.note(f"capture of {answer.hold_id}: entry {answer.entry_id} not as answered")
    for answer in _acknowledged(ledger, "void"):
        found.checked += 1
        hold = holds_by_id.get(answer.hold_id)
        if hold is None or hold.state != HoldState.VOIDED:
            found.lost += 1
            found.note(f"void of {answer.hold_id}: hold is {hold.state if hold else 'missing'}")
    for answer in _acknowledged(ledger, "refund"):
        found.checked += 1
        if answer.refund_entry_id not in entries_by_id:
            found.lost += 1
            found.note(f"refund entry {answer.refund_entry_id} not in the ledger")
    once = Check("one hold / entry per idempotency key", "0 duplicated")
    for what, records in (("hold", holds), ("entry", entries)):
        keys = collections.Counter(record.idempotency_key for record in records)
        once.checked += len(keys)
        for key, count in keys.items():
            if count > 1:
                once.duplicated += count - 1
                once.note(f"{count} {what} records for idempotency key {key}")
    return [found, once]


def _decision_check(policy_dsn: str, gateway_dsn: str, ledger: Ledger) -> Check:
    """A payment's decision is in the policy plane's log; a next-best-action
    decision is the gateway's own, its exposure kept in the gateway's store."""
    found = Check("acknowledged decisions stored (log, exposures)", "each once")
    payments = [a.decision_id for a in _acknowledged(ledger, "authorize") if a.decision_id]
    offers = [a.decision_id for a in _acknowledged(ledger, "decide") if a.decision_id]
    searches = (
        (
            policy_dsn,
            "decision log",
            "SELECT decision_id, count(*) FROM decision_log "
            "WHERE decision_id = ANY(%s) GROUP BY decision_id",
            (payments,),
            payments,
        ),
        (
            gateway_dsn,
            "exposures",
            "SELECT key, count(*) FROM remembered WHERE scope = %s AND key = ANY(%s) GROUP BY key",
            (f"{TENANT}\x1f{EXPOSURE_SCOPE}", offers),
            offers,
        ),
    )
    for dsn, where, sql, params, wanted in searches:
        with psycopg.connect(dsn, connect_timeout=5) as connection:
            rows = connection.execute(sql, params).fetchall()
        counts = {str(row[0]): int(row[1]) for row in rows}
        for decision_id in wanted:
            found.checked += 1
            count = counts.get(decision_id, 0)
            if count == 0:
                found.lost += 1
                found.note(f"decision {decision_id} not in the {where}")
            elif count > 1:
                found.duplicated += count - 1
    return found


def _replay_check(ledger: Ledger) -> Check:
    found = Check("same key again: the same effect", "0 mismatches")
    for call in ledger.calls:
        if call.acknowledged:
            found.checked += 1
        if call.replay_mismatch:
            found.duplicated += 1
            found.note(f"{call.kind} {call.key}: {call.replay_mismatch}")
    return found


async def stream_message_ids(stack: Stack) -> dict[str, collections.Counter[str]]:
    """Every Nats-Msg-Id in each stream of the spine, with how often it is there."""
    cluster = stack.jetstream_cluster
    urls = cluster.urls if cluster is not None else [stack.nats_url]
    client = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=10)
    found: dict[str, collections.Counter[str]] = {}
    try:
        js = client.jetstream(timeout=10.0)
        for name, subjects in bus.STREAMS.items():
            ids = await _read_stream_retrying(js, name, subjects[0])
            if ids is not None:
                found[name] = ids
    finally:
        await client.close()
    return found


async def _read_stream_retrying(
    js: Any, name: str, subject: str
) -> collections.Counter[str] | None:
    """The stream read whole (None: no such stream). A cluster just through
    its faults may answer a new consumer 503 (no leader yet) or stall a
    fetch: the read starts over, a bounded number of times, and never
    returns fewer messages than the stream holds."""
    last_error: BaseException | None = None
    for _ in range(STREAM_READ_TRIES):
        try:
            info = await js.stream_info(name)
            return await _read_stream(js, name, subject, int(info.state.messages))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as error:
            last_error = error
            await asyncio.sleep(STREAM_READ_RETRY_S)
    raise RuntimeError(f"stream {name} could not be read whole: {last_error!r}")


async def _read_stream(js: Any, name: str, subject: str, total: int) -> collections.Counter[str]:
    ids: collections.Counter[str] = collections.Counter()
    if total == 0:
        return ids
    consumer = await js.pull_subscribe(
        subject,
        durable=None,
        stream=name,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            # A reader's own: one copy in memory, no quorum to elect.
            num_replicas=1,
            mem_storage=True,
        ),
    )
    seen = 0
    try:
        while seen < total:
            # A fetch that times out before the last message raises: the
            # caller reads again rather than count a message as missing.
            for message in await consumer.fetch(min(FETCH_BATCH, total - seen), timeout=10.0):
                seen += 1
                msg_id = (message.headers or {}).get("Nats-Msg-Id", "")
                ids[msg_id or f"(no id: {name} seq {message.metadata.sequence.stream})"] += 1
    finally:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await consumer.unsubscribe()
    return ids


def _committed_events(dsns: Mapping[str, str]) -> dict[str, list[str]]:
    events: dict[str, list[str]] = {}
    for plane, dsn in dsns.items():
        with psycopg.connect(dsn, connect_timeout=5) as connection:
            events[plane] = [str(row[0]) for row in connection.execute(EVENT_QUERIES[plane])]
    return events


def _event_checks(
    stack: Stack, ledger: Ledger, streams: Mapping[str, collections.Counter[str]]
) -> list[Check]:
    everywhere: collections.Counter[str] = collections.Counter()
    for ids in streams.values():
        everywhere.update(ids)
    committed = Check("committed outbox events in JetStream", "each exactly once")
    for plane, event_ids in _committed_events(_dsns(stack)).items():
        for event_id in event_ids:
            committed.checked += 1
            count = everywhere.get(event_id, 0)
            if count == 0:
                committed.lost += 1
                committed.note(f"{plane} event {event_id} not in JetStream")
    acknowledged = Check("acknowledged ingest/outcome events in JetStream", "each exactly once")
    for event_id in _acknowledged_event_ids(ledger):
        acknowledged.checked += 1
        if everywhere.get(event_id, 0) == 0:
            acknowledged.lost += 1
            acknowledged.note(f"event {event_id} not in JetStream")
    unique = Check("no message id twice in a stream", "0 duplicated")
    for name, ids in streams.items():
        for msg_id, count in ids.items():
            unique.checked += 1
            if count > 1 and not msg_id.startswith("(no id"):
                unique.duplicated += count - 1
                unique.note(f"{name}: {msg_id} {count} times")
    return [committed, acknowledged, unique]


def _acknowledged_event_ids(ledger: Ledger) -> Iterable[str]:
    for call in ledger.calls:
        if not call.acknowledged:
            continue
        response = call.response
        if isinstance(response, gw.IngestEventsResponse):
            yield from (
                r.event_id for r in response.results if r.event_id and not r.HasField("error")
            )
        elif isinstance(response, gw.RecordOutcomeResponse):
            outcome_id = stable_id("out_", TENANT, call.key)
            yield stable_id("oc_", outcome_id)


async def _decision_logs(stack: Stack) -> Check:
    found = Check("every decision-log chain verifies", "all valid")
    dsn = stack.config.policy.store.postgres_dsn

    def chains() -> list[str]:
        with psycopg.connect(dsn, connect_timeout=5) as connection:
            rows = connection.execute(
                "SELECT chain_id FROM decision_log_marks UNION SELECT chain_id FROM decision_log"
            ).fetchall()
        return sorted({str(row[0]) for row in rows})

    async with open_channel(every_replica(stack, "policy"), stack.tls_files()) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for chain_id in await asyncio.to_thread(chains):
            answer = await stub.VerifyDecisionLog(
                policy_pb2.VerifyDecisionLogRequest(chain_id=chain_id), timeout=120
            )
            found.checked += int(answer.records_checked)
            if not answer.valid:
                found.failed += 1
                found.note(f"{chain_id}: {answer.problem} at {answer.first_bad_sequence}")
    return found
