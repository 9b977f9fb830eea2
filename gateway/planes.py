"""gRPC adapters of the ports: channels to the planes, calls with a timeout,
every failure turned into a TriplaneError carrying the plane's reason and the
field of the gateway's request it is about (gateway.fields).

The gateway dials every plane with mutual TLS as `spiffe://triplane/gateway`
(its own certificate, runtime.tls), and follows a rotation of its files: the
channels are replaced and the stubs rebuilt on the next call (plaintext with
`runtime.tls: off`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import grpc
from nats.js import JetStreamContext

from gateway import fields
from gateway.fields import FieldMap, public_error
from triplane.ai.v1 import ai_pb2, ai_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime import bus
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.config import Config
from triplane.runtime.errors import Code, TriplaneError, error_for
from triplane.runtime.net import dial_address
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.telemetry import trace_metadata
from triplane.runtime.tls import (
    GATEWAY,
    GRPC_OPTIONS,
    RotatingChannel,
    TlsFiles,
    channel_options,
    channel_options_for,
    files_for,
)

log = logging.getLogger("gateway.planes")

T = TypeVar("T")
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

# The plane methods the gateway calls that gRPC may retry on UNAVAILABLE
# (runtime.grpc.retry; each within its call's deadline): every one is
# idempotent by its contract, so a retry that lands on another replica after
# the first attempt was applied is answered, not applied twice.
# - Keyed writes: CreateTransfer (the transfer's idempotency_key, required and
#   remembered for good: a second attempt is a replay, so money never moves
#   twice), Evaluate (idempotency_key: the decision logged once),
#   RecordContact (contact_id), PutCustomerProfile (change_id), ReportOutcome
#   (outcome_id: the bandit counts it once).
# - Reads: GetEntry, GetDecision, GetEligibleOffers, CheckContact,
#   GetCustomerProfile, Score, Explain; and Rank, which makes a new rank_id
#   each call but learns nothing until an outcome quotes one, so a ranking
#   no answer carried only expires.
# Named one by one: a method added later is not retried until it is here.
IDEMPOTENT_PLANE_METHODS: tuple[tuple[str, str], ...] = (
    ("triplane.money.v1.LedgerService", "CreateTransfer"),
    ("triplane.money.v1.LedgerService", "GetEntry"),
    ("triplane.policy.v1.PolicyService", "Evaluate"),
    ("triplane.policy.v1.PolicyService", "GetDecision"),
    ("triplane.policy.v1.OfferService", "GetEligibleOffers"),
    ("triplane.policy.v1.ConsentService", "CheckContact"),
    ("triplane.policy.v1.ConsentService", "RecordContact"),
    ("triplane.policy.v1.CustomerProfileService", "PutCustomerProfile"),
    ("triplane.policy.v1.CustomerProfileService", "GetCustomerProfile"),
    ("triplane.ai.v1.ScoringService", "Score"),
    ("triplane.ai.v1.ScoringService", "Rank"),
    ("triplane.ai.v1.ScoringService", "Explain"),
    ("triplane.ai.v1.ScoringService", "ReportOutcome"),
)


def translate(plane: str, error: grpc.aio.AioRpcError, field_map: FieldMap) -> TriplaneError:
    """A plane's gRPC error as a domain error, keeping its code and reason and
    naming the field of the gateway's request (`field_map`: that plane request's
    table) instead of the plane's own."""
    code = error.code()
    reason, field_path = parse_rpc_error(error)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return error_for(
            Code.DEADLINE_EXCEEDED,
            reason or f"{plane}_DEADLINE_EXCEEDED",
            f"{plane} plane: timeout",
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and not reason:
        return error_for(
            Code.UNAVAILABLE, f"{plane}_UNAVAILABLE", f"{plane} plane unavailable; retry"
        )
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED):
        return error_for(
            Code.UNAVAILABLE, f"{plane}_FAILED", f"{plane} plane failed: {error.details()}"
        )
    number = code.value[0]
    found = error_for(number, reason or f"{plane}_ERROR", error.details() or "", field_path)
    return public_error(found, field_map)


async def _call(
    plane: str,
    method: Callable[..., Awaitable[T]],
    request: object,
    timeout_s: float,
    field_map: FieldMap,
) -> T:
    """One call to a plane on its budget, carrying the trace context."""
    try:
        return await method(request, timeout=timeout_s, metadata=trace_metadata())
    except grpc.aio.AioRpcError as error:
        raise translate(plane, error, field_map) from None


@dataclass
class PlaneChannels:
    """One channel per plane (gRPC multiplexes every call over it), with the
    gateway's certificate (`tls`; None: plaintext), each replaced when the
    files rotate."""

    money_address: str
    policy_address: str
    ai_address: str
    tls: TlsFiles | None = None
    check_interval_s: float = 5.0
    close_grace_s: float = 30.0
    # Load balancing and retries (runtime.grpc): from_config builds them; the
    # default is round_robin with no retry policy (transparent retries only).
    options: GRPC_OPTIONS = field(default_factory=lambda: channel_options(extra=CHANNEL_OPTIONS))
    money: RotatingChannel = field(init=False)
    policy: RotatingChannel = field(init=False)
    ai: RotatingChannel = field(init=False)

    def __post_init__(self) -> None:
        self.money = self._dial("money plane", self.money_address)
        self.policy = self._dial("policy plane", self.policy_address)
        self.ai = self._dial("AI plane", self.ai_address)

    @classmethod
    def from_config(
        cls,
        config: Config,
        money_address: str | None = None,
        policy_address: str | None = None,
        ai_address: str | None = None,
    ) -> PlaneChannels:
        """Each plane at the address given, else gateway.plane_addresses, else
        its own listen address on this machine. An address is any gRPC
        target: `dns:///money-plane.triplane.svc.cluster.local:50061` (a
        headless Service: every replica), `ipv4:10.0.0.1:50061,10.0.0.2:50061`
        or host:port; calls are spread by runtime.grpc.load_balancing."""
        tls = config.runtime.tls
        dial = config.gateway.plane_addresses
        return cls(
            money_address or dial.money or dial_address(config.money.listen),
            policy_address or dial.policy or dial_address(config.policy.listen),
            ai_address or dial.ai or dial_address(config.ai.listen),
            tls=files_for(config, GATEWAY),
            check_interval_s=tls.reload_check_interval_s,
            close_grace_s=tls.rotation_close_grace_s,
            options=channel_options_for(config, IDEMPOTENT_PLANE_METHODS, CHANNEL_OPTIONS),
        )

    def _dial(self, plane: str, address: str) -> RotatingChannel:
        return RotatingChannel(
            address,
            self.tls,
            self.options,
            check_interval_s=self.check_interval_s,
            close_grace_s=self.close_grace_s,
            who=f"gateway -> {plane}",
        )

    async def close(self) -> None:
        for channel in (self.money, self.policy, self.ai):
            await channel.close()


S = TypeVar("S")


class _Stubs(Generic[S]):
    """A plane's stubs on its current channel: rebuilt when a certificate
    rotation replaced the channel (one identity comparison a call)."""

    def __init__(
        self, source: grpc.aio.Channel | RotatingChannel, make: Callable[[grpc.aio.Channel], S]
    ) -> None:
        self._source = source
        self._make = make
        self._channel = self._current()
        self._stubs = make(self._channel)

    def _current(self) -> grpc.aio.Channel:
        source = self._source
        return source.channel if isinstance(source, RotatingChannel) else source

    def get(self) -> S:
        channel = self._current()
        if channel is not self._channel:
            self._channel, self._stubs = channel, self._make(channel)
        return self._stubs


class GrpcAi:
    def __init__(self, channel: grpc.aio.Channel | RotatingChannel) -> None:
        self._scoring = _Stubs(channel, ai_pb2_grpc.ScoringServiceStub)

    async def score(self, request: ai_pb2.ScoreRequest, timeout_s: float) -> ai_pb2.ScoreResponse:
        return await _call("AI", self._scoring.get().Score, request, timeout_s, fields.SCORE)

    async def rank(self, request: ai_pb2.RankRequest, timeout_s: float) -> ai_pb2.RankResponse:
        return await _call("AI", self._scoring.get().Rank, request, timeout_s, fields.AI)

    async def explain(
        self, request: ai_pb2.ExplainRequest, timeout_s: float
    ) -> ai_pb2.ExplainResponse:
        return await _call("AI", self._scoring.get().Explain, request, timeout_s, fields.AI)

    async def report_outcome(
        self, request: ai_pb2.ReportOutcomeRequest, timeout_s: float
    ) -> ai_pb2.ReportOutcomeResponse:
        return await _call("AI", self._scoring.get().ReportOutcome, request, timeout_s, fields.AI)


@dataclass(frozen=True)
class _PolicyStubs:
    policy: policy_pb2_grpc.PolicyServiceStub
    offers: policy_pb2_grpc.OfferServiceStub
    consent: policy_pb2_grpc.ConsentServiceStub
    profiles: policy_pb2_grpc.CustomerProfileServiceStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> _PolicyStubs:
        return cls(
            policy_pb2_grpc.PolicyServiceStub(channel),
            policy_pb2_grpc.OfferServiceStub(channel),
            policy_pb2_grpc.ConsentServiceStub(channel),
            policy_pb2_grpc.CustomerProfileServiceStub(channel),
        )


class GrpcPolicy:
    def __init__(self, channel: grpc.aio.Channel | RotatingChannel) -> None:
        self._stubs = _Stubs(channel, _PolicyStubs.on)

    async def evaluate(
        self,
        request: policy_pb2.EvaluateRequest,
        timeout_s: float,
        field_map: fields.FieldMap = fields.EVALUATE,
    ) -> policy_pb2.EvaluateResponse:
        method = self._stubs.get().policy.Evaluate
        return await _call("POLICY", method, request, timeout_s, field_map)

    async def get_decision(
        self, request: policy_pb2.GetDecisionRequest, timeout_s: float
    ) -> policy_pb2.GetDecisionResponse:
        method = self._stubs.get().policy.GetDecision
        return await _call("POLICY", method, request, timeout_s, fields.GET_DECISION)

    async def eligible_offers(
        self, request: policy_pb2.GetEligibleOffersRequest, timeout_s: float
    ) -> policy_pb2.GetEligibleOffersResponse:
        method = self._stubs.get().offers.GetEligibleOffers
        return await _call("POLICY", method, request, timeout_s, fields.ELIGIBLE_OFFERS)

    async def check_contact(
        self, request: policy_pb2.CheckContactRequest, timeout_s: float
    ) -> policy_pb2.CheckContactResponse:
        method = self._stubs.get().consent.CheckContact
        return await _call("POLICY", method, request, timeout_s, fields.CONTACT)

    async def record_contact(
        self, request: policy_pb2.RecordContactRequest, timeout_s: float
    ) -> policy_pb2.RecordContactResponse:
        method = self._stubs.get().consent.RecordContact
        return await _call("POLICY", method, request, timeout_s, fields.CONTACT)

    async def put_customer_profile(
        self, request: policy_pb2.PutCustomerProfileRequest, timeout_s: float
    ) -> policy_pb2.PutCustomerProfileResponse:
        method = self._stubs.get().profiles.PutCustomerProfile
        return await _call("POLICY", method, request, timeout_s, fields.PROFILE)

    async def get_customer_profile(
        self, request: policy_pb2.GetCustomerProfileRequest, timeout_s: float
    ) -> policy_pb2.GetCustomerProfileResponse:
        method = self._stubs.get().profiles.GetCustomerProfile
        return await _call("POLICY", method, request, timeout_s, fields.PROFILE)


class GrpcMoney:
    def __init__(self, channel: grpc.aio.Channel | RotatingChannel) -> None:
        self._ledger = _Stubs(channel, money_pb2_grpc.LedgerServiceStub)

    async def create_transfer(
        self, request: money_pb2.CreateTransferRequest, timeout_s: float
    ) -> money_pb2.CreateTransferResponse:
        method = self._ledger.get().CreateTransfer
        return await _call("MONEY", method, request, timeout_s, fields.TRANSFER)

    async def get_entry(
        self, request: money_pb2.GetEntryRequest, timeout_s: float
    ) -> money_pb2.GetEntryResponse:
        method = self._ledger.get().GetEntry
        return await _call("MONEY", method, request, timeout_s, fields.GET_ENTRY)

    async def call(
        self, method: str, request: object, timeout_s: float, field_map: fields.FieldMap
    ) -> object:
        """Any LedgerService method by name (the payout flows'), its errors
        naming the gateway request's fields per `field_map`."""
        stub_method = getattr(self._ledger.get(), method)
        result: object = await _call("MONEY", stub_method, request, timeout_s, field_map)
        return result


class EventOutbox(Protocol):
    def add_events(self, events: Sequence[OutgoingEvent]) -> None: ...


class NatsEventSink:
    """Events to JetStream: `publish` waits for acks; `enqueue` commits them to
    the gateway's outbox (with the answers they belong to), from which the
    shared outbox relay publishes them, so a slow or absent NATS never delays
    a decision and never loses its events."""

    def __init__(
        self, js: JetStreamContext | None, publish_timeout_s: float, outbox: EventOutbox
    ) -> None:
        self._js = js
        self._timeout_s = publish_timeout_s
        self._outbox = outbox

    async def publish(self, events: Sequence[OutgoingEvent], timeout_s: float) -> list[bool]:
        if self._js is None:
            return [False] * len(events)
        return await bus.publish_batch(self._js, events, min(timeout_s, self._timeout_s))

    def enqueue(self, events: Sequence[OutgoingEvent]) -> None:
        self._outbox.add_events(events)
