"""What every gateway flow shares: config, ports, tokenizer, remembered answers,
the clock, and the helpers that budget a hop and remember an answer."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from gateway.idempotency import IdempotencyStore, Remembered, check_same, derive_key, flatten
from gateway.pii import Tokenizer
from gateway.ports import AiPort, EventSink, MoneyPort, PolicyPort
from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayConfig
from triplane.runtime.deadline import Deadline

M = TypeVar("M", bound=Message)
T = TypeVar("T")

SKIP_KEY = frozenset({"idempotency_key"})


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per request: the caller's deadline and the trace id of the answer."""

    deadline: Deadline
    trace_id: str


def new_trace_id() -> str:
    return uuid.uuid4().hex


def stable_id(prefix: str, *parts: str) -> str:
    """A deterministic identifier (same inputs, same id: retries stay idempotent)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{prefix}{digest[:32]}"


@dataclass
class Core:
    config: GatewayConfig
    ai: AiPort
    policy: PolicyPort
    money: MoneyPort
    events: EventSink
    tokenizer: Tokenizer
    store: IdempotencyStore
    clock: Clock

    def timeout_s(self, call: CallContext, hop_budget_ms: float) -> float:
        return call.deadline.for_next_hop(self.config.budgets.own_budget_ms, hop_budget_ms)

    def derive(self, tenant_id: str, rpc: str, key: str, step: str) -> str:
        return derive_key(tenant_id, rpc, key, step)

    def fingerprint(self, tenant_id: str, request: Message) -> dict[str, str]:
        """What is remembered of a request: each field's keyed hash (never the
        value: a card number, a name or a phone must not rest in the store),
        enough to name the first field a reuse of the key changed."""
        return self.tokenizer.digest_fields(tenant_id, flatten(request, SKIP_KEY))

    async def remembered(
        self, tenant_id: str, rpc: str, key: str, request: Message
    ) -> tuple[dict[str, str], Remembered | None]:
        """The request's field hashes, and the answer remembered for its key
        (checked to be for the same payload: another one is ALREADY_EXISTS).
        None means the calling task now holds the key, on every replica
        sharing the store: it runs the flow and `remember`s the answer; a
        task or replica given the key meanwhile waits for that answer, and a
        task that ends without one gives the key up."""
        fields = self.fingerprint(tenant_id, request)
        found = await self.store.claim(f"{tenant_id}\x1f{rpc}", key, fields)
        if found is not None:
            check_same(found, fields)
        return fields, found

    def remember(
        self, tenant_id: str, rpc: str, key: str, fields: dict[str, str], answer: Message
    ) -> None:
        self.store.put(
            f"{tenant_id}\x1f{rpc}", key, fields, answer.SerializeToString(deterministic=True)
        )

    async def idempotent(
        self,
        tenant_id: str,
        rpc: str,
        key: str,
        request: Message,
        answer_type: type[M],
        run: Callable[[], Awaitable[M]],
    ) -> M:
        """Runs `run` once per key: a retry gets the remembered answer (with
        `replayed` set), another payload under the key is ALREADY_EXISTS."""
        fields, found = await self.remembered(tenant_id, rpc, key, request)
        if found is not None:
            answer = answer_type.FromString(found.body)
            answer.replayed = True  # type: ignore[attr-defined]
            return answer
        answer = await run()
        self.remember(tenant_id, rpc, key, fields, answer)
        return answer
