"""The fuzz run's world: the whole stack as the dev supervisor runs it (every
plane its own process, mutual TLS, an embedded NATS), a seeded tenant, the
callers (the admin certificate for the planes, a partner API key with every
scope for the gateway), and one case: build the request, snapshot what it
could change, call, check the answer and the state.

Figures (`make fuzz`, through bench.common.merge_results):
fuzz_cases_total, fuzz_internal_total (INTERNAL or UNKNOWN answers),
fuzz_state_changes_total (refused calls that changed something), and the
same per plane (fuzz_<plane>_cases_total, ...).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from gateway.auth.scopes import ALL_SCOPES
from tests.fuzz.state import StateProbe, differences
from tests.fuzz.strategies import (
    Hints,
    SpecStrategies,
    add_to_pool,
    build,
    harvest,
    pooled,
    spec_bytes,
)
from tests.fuzz.targets import Target
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import open_sync_channel
from triplane_sim import synth
from triplane_sim.demo_world import World, seed
from triplane_tools.partner_keys import create_partner_key
from triplane_tools.stack import Stack

T = TypeVar("T")

# Cases per plane (split over its RPCs): `make fuzz` sets 10,000; `make test`
# runs this short default.
CASES_PER_PLANE = int(os.environ.get("TRIPLANE_FUZZ_CASES", "150"))
SEED = int(os.environ.get("TRIPLANE_FUZZ_SEED", "20260611"))
# Every call's deadline. A call still running then is a finding (a request
# that holds a server this long is a denial of service), not a refusal.
CALL_DEADLINE_S = float(os.environ.get("TRIPLANE_FUZZ_DEADLINE_S", "20"))
WRITE_RESULTS = os.environ.get("TRIPLANE_FUZZ_WRITE_RESULTS", "") not in ("", "0")

TENANT = "fuzz"
OTHER_TENANT = "fuzz_other"
CUSTOMERS, MERCHANTS = 12, 8
# After a call: how long nothing may change before the stack counts as
# settled, and the longest wait for it (the gateway writes its answers a
# moment after it sends them; the relays publish what the outboxes hold).
QUIET_S = 0.025
SETTLE_MAX_S = 2.0
# The largest request drawn. Past the servers' 4 MiB limit gRPC refuses a
# request before any plane code runs, so a larger one tests nothing more; an
# item repeated past a count limit can otherwise make one of gigabytes (1.1 GB
# was drawn: minutes of the client's CPU, and over 2 GiB protobuf cannot
# serialize at all).
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Ids the servers answered, kept per field name for later requests.
POOL_BOUND = 256
# Findings kept per RPC and kind, the smallest requests first.
FINDINGS_KEPT = 3
REQUEST_TEXT_CHARS = 1500

# Answers that are never a legitimate refusal of a legitimate caller.
INTERNAL_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
UNEXPECTED_CODES = frozenset(
    {
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
# A caller's own deadline or cancellation: the server may still finish the
# work, so no "refused, yet changed" check.
ABANDONED_CODES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

# Every answered string field whose name ends so is kept for later requests.
POOLED_SUFFIXES = ("_id", "token", "version")
# Pools a request field draws from when it is named differently.
POOL_OF_FIELD = {"page_token": "next_page_token", "bundle_version": "version"}

ALIAS_BOMB = 'a: &a ["x", "x"]\nb: &b [*a, *a]\nc: [*b, *b]\n'
DEFAULT_BUNDLE = (
    Path(__file__).resolve().parents[2] / "policy_plane" / "bundles" / "default.yaml"
).read_text()


class LoopThread:
    """An event loop in a thread of its own, for what is asynchronous (the
    stack's supervisor, the admin clients, NATS). The stack spawns its
    children from this thread, so they die with it (the parent-death signal)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Finding:
    kind: str  # internal, unexpected, state_change, timeout, crash
    target: str
    code: str
    detail: str
    request: str
    size: int

    def describe(self) -> str:
        return (
            f"[{self.kind}] {self.target}: {self.code} {self.detail}\n"
            f"    request ({self.size} bytes): {self.request}"
        )


@dataclass
class PlaneTally:
    cases: int = 0
    accepted: int = 0
    internal: int = 0
    state_changes: int = 0
    unexpected: int = 0
    timeouts: int = 0
    crashes: int = 0
    unsettled: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)


@dataclass
class Tally:
    planes: dict[str, PlaneTally] = field(default_factory=dict)
    findings: dict[tuple[str, str], list[Finding]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)

    def plane(self, name: str) -> PlaneTally:
        return self.planes.setdefault(name, PlaneTally())

    def add_finding(self, finding: Finding) -> None:
        kept = self.findings.setdefault((finding.target, finding.kind), [])
        kept.append(finding)
        kept.sort(key=lambda f: f.size)
        del kept[FINDINGS_KEPT:]

    def findings_of(self, target: str) -> list[Finding]:
        return [
            f for (name, _), found in sorted(self.findings.items()) if name == target for f in found
        ]

    def totals(self) -> dict[str, float | int | str]:
        planes = self.planes.values()
        figures: dict[str, float | int | str] = {
            "fuzz_cases_total": sum(p.cases for p in planes),
            "fuzz_internal_total": sum(p.internal for p in planes),
            "fuzz_state_changes_total": sum(p.state_changes for p in planes),
            "fuzz_accepted_total": sum(p.accepted for p in planes),
            "fuzz_unexpected_status_total": sum(p.unexpected for p in planes),
            "fuzz_timeouts_total": sum(p.timeouts for p in planes),
            "fuzz_crashes_total": sum(p.crashes for p in planes),
            "fuzz_unsettled_total": sum(p.unsettled for p in planes),
            "fuzz_cases_per_plane_target": CASES_PER_PLANE,
            "fuzz_seed": SEED,
            "fuzz_run_s": round(time.monotonic() - self.started_at, 1),
        }
        for name, plane in sorted(self.planes.items()):
            figures[f"fuzz_{name}_cases_total"] = plane.cases
            figures[f"fuzz_{name}_accepted_total"] = plane.accepted
            figures[f"fuzz_{name}_internal_total"] = plane.internal
            figures[f"fuzz_{name}_state_changes_total"] = plane.state_changes
        return figures

    def summary(self) -> str:
        lines = ["fuzz: " + json.dumps(self.totals(), sort_keys=True)]
        for name, plane in sorted(self.planes.items()):
            codes = ", ".join(f"{code} {n}" for code, n in plane.codes.most_common())
            lines.append(f"  {name}: {plane.cases} cases ({codes})")
            reasons = ", ".join(
                f"{code} {reason} {n}" for (code, reason), n in plane.reasons.most_common(8)
            )
            lines.append(f"    most refused: {reasons}")
        return "\n".join(lines)


TALLY = Tally()


def _config(state_dir: Path) -> Config:
    """The dev stack's config on free ports, with the background sweeps that
    would change state on their own between two snapshots turned far out
    (hold expiry, reserve release, token purge, outbox cleanup, the trigger
    runner, the delivery worker and the bandit's snapshot are no fuzz target; the rail worker,
    which leases and polls the bank on its own, is off) and the relays and the gateway's answer
    writer quick, so a stack settles fast."""
    far_s = 86_400
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_level": "WARNING"},
            "money": {
                "listen": f"127.0.0.1:{free_port()}",
                "holds": {"expiry_sweep_interval_s": far_s},
                "reserves": {"release_sweep_interval_s": far_s},
                "outbox": {
                    "relay_idle_poll_ms": 5,
                    "relay_idle_max_ms": 5,
                    "cleanup_interval_s": far_s,
                },
                "tokens": {"purge_interval_s": far_s},
                "recon": {"sweep_interval_s": far_s},
                "payouts": {"settlement_sweep_interval_s": far_s},
            },
            # No bank: the rail worker stays off.
            "rails": {"bank_url": ""},
            "policy": {
                "listen": f"127.0.0.1:{free_port()}",
                "outbox": {"relay_interval_s": 0.005},
                "decision_log": {"retention_sweep_interval_s": far_s},
            },
            "ai": {
                "listen": f"127.0.0.1:{free_port()}",
                # The posterior's periodic snapshot (a JetStream object store)
                # is a write no call made: only at shutdown. So is the
                # learner's sweep of closed reward windows (a 0 published on
                # TRIPLANE_AI for a ranking an hour old): far out.
                "bandit": {"snapshot_interval_s": 0},
                "learner": {"sweep_interval_s": far_s},
            },
            "gateway": {
                "listen": f"127.0.0.1:{free_port()}",
                "idempotency": {"flush_interval_ms": 1},
                "outbox": {
                    "relay_idle_poll_ms": 5,
                    "relay_idle_max_ms": 5,
                    "cleanup_interval_s": far_s,
                },
                "rate_limit": {"rate_per_s": 1_000_000, "burst": 1_000_000},
                "triggers": {"runner_poll_interval_s": far_s},
                "delivery": {"poll_interval_s": far_s},
            },
            "stack": {"start_timeout_s": 150.0},
        },
    )


def _hints(world: World) -> Hints:
    accounts = [c.account_id for c in world.customers] + [m.merchant_id for m in world.merchants]
    customers = [world.customer_id(c) for c in world.customers]
    account = st.one_of(st.sampled_from(accounts), pooled("account_id"))
    ids: dict[str, st.SearchStrategy[Any]] = {
        "tenant_id": st.sampled_from((TENANT, TENANT, TENANT, OTHER_TENANT, "")),
        "account_id": account,
        "debit_account_id": account,
        "credit_account_id": account,
        "original_account_id": account,
        "release_account_id": account,
        "merchant_id": st.sampled_from([m.merchant_id for m in world.merchants]),
        "customer_id": st.sampled_from(customers),
        "offer_id": st.one_of(st.sampled_from(sorted(synth.CATALOG)), pooled("offer_id")),
        "currency": st.sampled_from(("USD", "USD", "EUR", "JPY", "BHD", "usd", "XXX", "")),
        "model": st.sampled_from(("payment_risk", "offer_propensity")),
        "time_zone": st.sampled_from(("UTC", "America/Sao_Paulo", "Etc/GMT+12", "Mars/Base")),
        "country": st.sampled_from(("US", "BR", "GB", "IR", "us", "ZZ")),
        "region": st.sampled_from(("US", "BR", "EU", "")),
        "surface": st.sampled_from(("checkout", "payouts", "app_home", "push", "nowhere")),
        "product": st.sampled_from(("cashback", "bnpl", "savings", "credit_line_increase")),
        "scopes": st.sampled_from((*sorted(ALL_SCOPES), "root", "")),
        "idempotency_key": st.one_of(st.uuids().map(str), pooled("idempotency_key")),
        "content": st.sampled_from((DEFAULT_BUNDLE, ALIAS_BOMB, "rules: []\n", "{", "- 1\n")),
        "eligibility": st.sampled_from(
            ("customer.kyc_tier >= 2", "true", "1/0", "customer.x.y", "(" * 40 + "1" + ")" * 40)
        ),
        "card_number": st.sampled_from(
            ("4111 1111 1111 1111", "4111111111111112", "\uff14" + "1" * 15)
        ),
        "email": st.sampled_from(("jane@example.com", "a@b", "@", "x" * 300 + "@example.com")),
        "phone": st.sampled_from(("+14155552671", "415 555 2671", "+999", "2026-06-11")),
        "name": st.sampled_from(("Jane Doe", "Ali Al-Rashid", "\u0412\u043b\u0430\u0434", "")),
    }
    for name in (
        "hold_id",
        "entry_id",
        "decision_id",
        "case_id",
        "score_id",
        "rank_id",
        "delivery_id",
        "key_id",
        "outcome_id",
        "decision_token",
        "version",
        "page_token",
        "bundle_version",
    ):
        ids[name] = pooled(POOL_OF_FIELD.get(name, name))
    numbers = {
        "amount_minor": st.sampled_from((1, 100, 2_500, 1_000_000, 100_000_000_001)),
        # Fixed instants (a run is reproducible): 2023, 2027, 2100, and 0.
        "seconds": st.sampled_from((0, 1_700_000_000, 1_800_000_000, 4_102_444_800)),
        "version": st.integers(0, 4),
        "kyc_tier": st.integers(0, 4),
        "local_hour": st.integers(-1, 24),
        "hour_of_day": st.integers(0, 24),
        "top_k": st.integers(0, 40),
        "page_size": st.integers(-1, 3),
    }
    return Hints(ids, numbers)


class FuzzWorld:
    """The running stack and everything a case needs."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.tmp = Path(tempfile.mkdtemp(prefix="triplane-fuzz-"))
        self.config = _config(self.tmp / "state")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"
        }
        self.stack = Stack(self.config, environ=env)
        self.pools: dict[str, list[str]] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._callables: dict[str, Any] = {}
        self._nats: NatsClient | None = None
        self.probe: StateProbe | None = None
        self.own_key_id = ""
        self.api_key = ""
        self._strategies: tuple[SpecStrategies, SpecStrategies] | None = None

    # ---- start and stop ----

    def start(self) -> None:
        self.loop.run(self.stack.start(), timeout_s=300)
        world = self.loop.run(self._seed(), timeout_s=300)
        hints = _hints(world)
        self._strategies = (SpecStrategies(hints), SpecStrategies(hints, tame=True))
        self._nats = self.loop.run(self._connect_nats(), timeout_s=30)
        self.probe = StateProbe.of_state_dir(self.stack.state_dir, self._streams)
        self.probe.settle(QUIET_S, 10.0)

    async def _seed(self) -> World:
        addresses, tls = self.stack.addresses, self.stack.tls_files()
        world = await seed(
            addresses["money"], addresses["policy"], TENANT, CUSTOMERS, MERCHANTS, tls=tls
        )
        await seed(addresses["money"], addresses["policy"], OTHER_TENANT, 4, MERCHANTS, tls=tls)
        self.api_key = await create_partner_key(
            self.config,
            addresses["gateway"],
            TENANT,
            scopes=sorted(ALL_SCOPES),
            state_dir=self.stack.state_dir,
        )
        # tpk_<environment>_<key id>_<secret><checksum>: never revoked or
        # rotated by the fuzz itself (its id is kept out of the pools).
        self.own_key_id = self.api_key.split("_")[2]
        return world

    async def _connect_nats(self) -> NatsClient:
        client = NatsClient()
        await client.connect(self.stack.nats_url, name="fuzz-probe")
        return client

    async def _stream_list(self) -> dict[str, int]:
        assert self._nats is not None
        reply = await self._nats.request("$JS.API.STREAM.LIST", b"{}", timeout=5)
        answer = json.loads(reply.data)
        return {s["config"]["name"]: int(s["state"]["last_seq"]) for s in answer.get("streams", [])}

    def _streams(self) -> dict[str, int]:
        return self.loop.run(self._stream_list(), timeout_s=10)

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        if self.probe is not None:
            self.probe.close()
        if self._nats is not None:
            self.loop.run(self._nats.close(), timeout_s=10)
        try:
            self.loop.run(self.stack.stop(), timeout_s=120)
        finally:
            self.loop.close()
            if TALLY.findings:
                # The planes' logs say why; kept for whoever reads the findings.
                print(f"fuzz: findings; the stack's state and logs are kept in {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def strategy_for(self, target: Target) -> st.SearchStrategy[dict[str, Any]]:
        """Hostile requests, and as many tame ones that get further."""
        assert self._strategies is not None, "start() first"
        hostile, tame = self._strategies
        return st.one_of(
            hostile.for_message(target.input_type), tame.for_message(target.input_type)
        ).filter(lambda spec: spec_bytes(spec) <= MAX_REQUEST_BYTES)

    # ---- callers ----

    def _callable(self, target: Target) -> Any:
        found = self._callables.get(target.path)
        if found is None:
            channel = self._channels.get(target.plane)
            if channel is None:
                tls = (
                    self.stack.partner_tls()
                    if target.plane == "gateway"
                    else self.stack.tls_files()
                )
                channel = open_sync_channel(
                    self.stack.addresses[target.plane],
                    tls,
                    options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
                    who=f"fuzz {target.plane}",
                )
                self._channels[target.plane] = channel
            response_class = GetMessageClass(target.output_type)
            found = channel.unary_unary(
                target.path,
                request_serializer=lambda message: message.SerializeToString(),
                response_deserializer=response_class.FromString,
            )
            self._callables[target.path] = found
        return found

    def _metadata(self, target: Target) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if target.plane == "gateway" else ()

    # ---- one case ----

    def run_case(self, target: Target, spec: dict[str, Any]) -> None:
        assert self.probe is not None
        request = build(target.input_type, spec, self.pools)
        tally = TALLY.plane(target.plane)
        tally.cases += 1
        before = self.probe.snapshot()
        started = time.monotonic()
        code, response, detail = self._call(target, request)
        elapsed_s = time.monotonic() - started
        self._check_alive(target, request)
        tally.codes[code.name] += 1
        if code is grpc.StatusCode.OK:
            tally.accepted += 1
            assert response is not None
            self._remember(request, response)
            self._settle(tally)
            return
        tally.reasons[(code.name, detail.split(" ", 1)[0])] += 1
        if code in INTERNAL_CODES:
            tally.internal += 1
            self._finding("internal", target, code, detail, request)
        elif code in UNEXPECTED_CODES:
            tally.unexpected += 1
            self._finding("unexpected", target, code, detail, request)
        if code in ABANDONED_CODES:
            if elapsed_s >= CALL_DEADLINE_S * 0.9:
                tally.timeouts += 1
                self._finding("timeout", target, code, f"after {elapsed_s:.1f} s", request)
            self._settle(tally)
            return
        if target.plane == "gateway":
            # The gateway writes what it remembers a moment after answering.
            self._settle(tally)
        changed = differences(before, self.probe.snapshot())
        if changed:
            tally.state_changes += 1
            self._finding(
                "state_change", target, code, f"{detail}; changed: {'; '.join(changed)}", request
            )
            self._settle(tally)  # the next case starts from a quiet stack

    def _call(
        self, target: Target, request: Message
    ) -> tuple[grpc.StatusCode, Message | None, str]:
        try:
            response = self._callable(target)(
                request, timeout=CALL_DEADLINE_S, metadata=self._metadata(target)
            )
        except grpc.RpcError as error:
            code = error.code()
            details = str(error.details() or "")[:300]
            try:
                reason, where = parse_rpc_error(error)
            except ValueError as unreadable:
                # The status a server packed is not the one that arrived (the
                # transport refused it, e.g. trailers over the size limit):
                # the caller cannot read why it was refused.
                TALLY.plane(target.plane).unexpected += 1
                self._finding("unreadable_status", target, code, str(unreadable), request)
                return code, None, f"UNREADABLE - {details}"
            return code, None, f"{reason or '-'} {where or '-'} {details}"
        return grpc.StatusCode.OK, response, ""

    def _remember(self, request: Message, response: Message) -> None:
        harvest(response, lambda name: name.endswith(POOLED_SUFFIXES), self.pools, POOL_BOUND)
        key = (
            getattr(request, "idempotency_key", "")
            if "idempotency_key" in request.DESCRIPTOR.fields_by_name
            else ""
        )
        if key:
            add_to_pool(self.pools, "idempotency_key", [key], POOL_BOUND)
        own = self.pools.get("key_id", [])
        if self.own_key_id in own:
            own.remove(self.own_key_id)

    def _settle(self, tally: PlaneTally) -> None:
        assert self.probe is not None
        if not self.probe.settle(QUIET_S, SETTLE_MAX_S):
            tally.unsettled += 1

    def _check_alive(self, target: Target, request: Message) -> None:
        dead = [p for p in self.stack.processes if not p.running()]
        if not dead:
            return
        TALLY.plane(target.plane).crashes += 1
        names = ", ".join(f"{p.name} (exit {p.process.returncode}, log {p.log_path})" for p in dead)
        self._finding("crash", target, grpc.StatusCode.UNAVAILABLE, f"plane died: {names}", request)
        raise PlaneDied(names)

    def _finding(
        self, kind: str, target: Target, code: grpc.StatusCode, detail: str, request: Message
    ) -> None:
        text = text_format.MessageToString(request, as_one_line=True)
        TALLY.add_finding(
            Finding(
                kind,
                target.test_id,
                code.name,
                detail,
                text[:REQUEST_TEXT_CHARS],
                request.ByteSize(),
            )
        )


class PlaneDied(Exception):
    """A plane process exited during the fuzz run: every later case is moot."""
