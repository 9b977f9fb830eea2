"""ListDecisions: a tenant's logged decisions found by decision id, customer
(id or name token), account and time window, newest first, a page at a time.

Served from `decision_search` (policy_plane/store.py), the index the decision
log writes in the transaction that logs each decision: every filter but the
decision id reads one of its indexes in order, so a page costs its size
whatever the log holds. A decision id is looked up in the log itself (its
unique index), so a decision logged before the search index existed is still
found by its id. Names are never searched in clear: the customer's name is
found by its token (`ptok_name_...`, what an operator without pii:read sees).
"""

from __future__ import annotations

import asyncio

from policy_plane import codec, validate
from policy_plane.engine import PolicyEngine
from policy_plane.model import Decision, DecisionRecord, record_decoder
from policy_plane.pii import TOKEN_PREFIX
from policy_plane.store import DecisionQuery, LogRow
from triplane.common.v1 import types_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.errors import InvalidArgument

DECISIONS_PAGE = "policy.decisions"


def query_of(request: pb.ListDecisionsRequest, engine: PolicyEngine) -> DecisionQuery:
    """The request's filters, checked (each bad one names its field)."""
    limits = engine.config.limits
    if request.account_id:
        validate.check_id(request.account_id, "account_id", limits)
    customer = request.customer.strip()
    if customer:
        validate.check_id(customer, "customer", limits)
    start_us = wire.micros(request.start_time, "start_time")
    end_us = wire.micros(request.end_time, "end_time")
    if start_us and end_us and end_us <= start_us:
        raise InvalidArgument("WINDOW_INVALID", "end_time must be after start_time", "end_time")
    return DecisionQuery(
        tenant_id=request.tenant_id,
        account_id=request.account_id,
        customer=customer,
        by_token=customer.startswith(TOKEN_PREFIX),
        start_us=start_us,
        end_us=end_us,
    )


def _matches(query: DecisionQuery, row: LogRow, record: DecisionRecord, token: str) -> bool:
    payment = record.input.payment
    if query.account_id and row.account_id != query.account_id:
        return False
    if query.customer:
        found = token if query.by_token else payment.customer_id
        if found != query.customer:
            return False
    if query.start_us and row.recorded_at_us < query.start_us:
        return False
    return not (query.end_us and row.recorded_at_us >= query.end_us)


def listed(engine: PolicyEngine, row: LogRow, record: DecisionRecord) -> pb.ListedDecision:
    """A row as the search lists it: the decision, its amount and movement,
    its customer's id and name token (never the name) and its log time."""
    payment = record.input.payment
    return pb.ListedDecision(
        decision=codec.decision_pb(
            Decision(record=record, chain_id=row.chain_id, sequence=row.seq)
        ),
        amount=types_pb2.Money(amount_minor=payment.amount_minor, currency=payment.currency),
        movement=codec.MOVEMENT_ENUMS.get(payment.movement, pb.MONEY_MOVEMENT_UNSPECIFIED),
        customer_id=payment.customer_id,
        customer_name_token=engine.sealer.token(row.tenant_id, payment.customer.name),
        recorded_at=wire.timestamp(row.recorded_at_us),
    )


async def list_decisions(
    engine: PolicyEngine, request: pb.ListDecisionsRequest
) -> pb.ListDecisionsResponse:
    engine.require_tenant(request.tenant_id)
    limits = engine.config.limits
    size = wire.page_size(request.page_size, limits.default_page_size, limits.max_page_size)
    query = query_of(request, engine)
    position = wire.decode_page_token(request.page_token, DECISIONS_PAGE, (int, str))
    if request.decision_id:
        validate.check_id(request.decision_id, "decision_id", limits)
        # One decision at most: its own unique index, then the other filters.
        if position is not None:
            return pb.ListDecisionsResponse()
        row = await asyncio.to_thread(engine.store.get_decision, request.decision_id)
        if row is None or row.tenant_id != request.tenant_id:
            return pb.ListDecisionsResponse()
        record = engine.sealer.open(record_decoder.decode(row.body))
        token = engine.sealer.token(row.tenant_id, record.input.payment.customer.name)
        if not _matches(query, row, record, token):
            return pb.ListDecisionsResponse()
        return pb.ListDecisionsResponse(decisions=[listed(engine, row, record)])
    before = (int(position[0]), str(position[1])) if position is not None else None
    rows = await asyncio.to_thread(engine.store.search_page, query, before, size + 1)
    response = pb.ListDecisionsResponse(
        decisions=[
            listed(engine, row, engine.sealer.open(record_decoder.decode(row.body)))
            for row in rows[:size]
        ]
    )
    if len(rows) > size:
        last = rows[size - 1]
        response.next_page_token = wire.encode_page_token(
            DECISIONS_PAGE, (last.recorded_at_us, last.decision_id)
        )
    return response
