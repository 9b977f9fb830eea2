"""What the orchestrator needs from the planes and the event spine.

The orchestrator codes against these protocols and never imports grpc; the
adapters in `gateway.planes` speak gRPC and turn every failure into a
TriplaneError (code, reason, field), so the domain handles one error type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.fields import FieldMap
from triplane.ai.v1 import ai_pb2
from triplane.gateway.v1 import gateway_pb2
from triplane.money.v1 import money_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime.bus import OutgoingEvent


@dataclass(frozen=True, slots=True)
class IngestedEvent:
    """A validated, normalized, tokenized behavioural event (no PII)."""

    event_id: str
    tenant_id: str
    # Dotted kind, e.g. "loan.simulated", "flow.abandoned", "partner.cart_viewed".
    event_type: str
    customer_id: str
    customer_token: str
    account_id: str
    occurred_at_us: int
    amount_minor: int = 0
    currency: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


class AiPort(Protocol):
    async def score(
        self, request: ai_pb2.ScoreRequest, timeout_s: float
    ) -> ai_pb2.ScoreResponse: ...

    async def rank(self, request: ai_pb2.RankRequest, timeout_s: float) -> ai_pb2.RankResponse: ...

    async def explain(
        self, request: ai_pb2.ExplainRequest, timeout_s: float
    ) -> ai_pb2.ExplainResponse: ...

    async def report_outcome(
        self, request: ai_pb2.ReportOutcomeRequest, timeout_s: float
    ) -> ai_pb2.ReportOutcomeResponse: ...


class PolicyPort(Protocol):
    async def evaluate(
        self,
        request: policy_pb2.EvaluateRequest,
        timeout_s: float,
        field_map: FieldMap = ...,
    ) -> policy_pb2.EvaluateResponse:
        """`field_map`: which caller fields the plane's errors are about
        (gateway.fields.EVALUATE unless given)."""
        ...

    async def get_decision(
        self, request: policy_pb2.GetDecisionRequest, timeout_s: float
    ) -> policy_pb2.GetDecisionResponse: ...

    async def eligible_offers(
        self, request: policy_pb2.GetEligibleOffersRequest, timeout_s: float
    ) -> policy_pb2.GetEligibleOffersResponse: ...

    async def check_contact(
        self, request: policy_pb2.CheckContactRequest, timeout_s: float
    ) -> policy_pb2.CheckContactResponse: ...

    async def record_contact(
        self, request: policy_pb2.RecordContactRequest, timeout_s: float
    ) -> policy_pb2.RecordContactResponse: ...

    async def put_customer_profile(
        self, request: policy_pb2.PutCustomerProfileRequest, timeout_s: float
    ) -> policy_pb2.PutCustomerProfileResponse: ...

    async def get_customer_profile(
        self, request: policy_pb2.GetCustomerProfileRequest, timeout_s: float
    ) -> policy_pb2.GetCustomerProfileResponse: ...


class MoneyPort(Protocol):
    async def create_transfer(
        self, request: money_pb2.CreateTransferRequest, timeout_s: float
    ) -> money_pb2.CreateTransferResponse: ...

    async def get_entry(
        self, request: money_pb2.GetEntryRequest, timeout_s: float
    ) -> money_pb2.GetEntryResponse: ...


class EventSink(Protocol):
    async def publish(self, events: Sequence[OutgoingEvent], timeout_s: float) -> list[bool]:
        """Publishes now; True for each event the spine acknowledged."""
        ...

    def enqueue(self, events: Sequence[OutgoingEvent]) -> None:
        """Publishes in the background (batched, retried); never blocks."""
        ...


class Assigned(Protocol):
    @property
    def arm(self) -> str: ...

    @property
    def holdout(self) -> bool: ...


class ExperimentsPort(Protocol):
    def assign(self, tenant_id: str, experiment: str, customer_token: str) -> Assigned:
        """Deterministic arm (and global holdout) of a customer."""
        ...


class MeasurementPort(Protocol):
    async def exposure(
        self, tenant_id: str, at_us: int, exposure: gateway_pb2.ExposureLogged
    ) -> None: ...

    async def outcome(
        self, tenant_id: str, at_us: int, outcome: gateway_pb2.OutcomeRecorded
    ) -> None: ...

    async def conversions(self, events: list[tuple[str, str, str, str, int]]) -> None:
        """Behavioural events, matched against each exposed offer's conversion
        definition: (event_id, tenant_id, customer_token, event_type, at_us)."""
        ...


class TriggersPort(Protocol):
    async def on_event(self, event: IngestedEvent) -> int:
        """Hands a behavioural event to the trigger rules; returns sends scheduled."""
        ...
