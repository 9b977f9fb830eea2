"""The NATS JetStream event spine: the one envelope, subjects, streams, publish.

Subjects are `triplane.<plane>.<tenant_id>.<event kind...>`, so a consumer can
take one tenant's history (`triplane.money.acme.>`) for a backfill or replay.
Every publish sets `Nats-Msg-Id` to the envelope's event_id: JetStream drops a
re-publish of the same event inside the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import nats
from google.protobuf.message import Message
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from triplane.common.v1 import envelope_pb2, types_pb2
from triplane.runtime import codec
from triplane.runtime.config import NatsConfig, StreamLimitsConfig
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.ids import check_tenant_id
from triplane.runtime.nats_security import nats_options

log = logging.getLogger("triplane.bus")

# Streams of the spine: name -> subjects. Each plane ensures the ones it writes.
STREAMS: dict[str, list[str]] = {
    "TRIPLANE_MONEY": ["triplane.money.>"],
    "TRIPLANE_POLICY": ["triplane.policy.>"],
    "TRIPLANE_AI": ["triplane.ai.>"],
    "TRIPLANE_GATEWAY": ["triplane.gateway.>"],
    # The tenant registry (triplane/runtime/tenants.py), written by the money plane.
    "TRIPLANE_TENANTS": ["triplane.tenants.>"],
}


# The planes a subject may name: the `<plane>` of each stream's `triplane.<plane>.>`.
SUBJECT_PLANES = frozenset(
    subject.split(".")[1] for subjects in STREAMS.values() for subject in subjects
)
# One token of an event type. A subject token must hold no `.` (it separates
# tokens), `*` or `>` (wildcards: a subscriber's, never a publisher's), white
# space (it ends a subject) and must not be empty, or an event lands under
# another tenant's or kind's subject, or a filter reads more than it should.
# Event types are lower snake case (`gateway.behaviour.partner.<kind>`), which
# is narrower still. The tenant id has its own rule (triplane.runtime.ids).
EVENT_TYPE_TOKEN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_EVENT_TYPE_TOKENS = 8


def check_event_type(event_type: str, field: str = "event_type") -> None:
    """Raises InvalidArgument EVENT_TYPE_INVALID unless `event_type` is
    `<plane>.<kind>[.<kind>...]` with a spine plane and NATS-safe tokens."""
    tokens = event_type.split(".")
    if (
        not 2 <= len(tokens) <= MAX_EVENT_TYPE_TOKENS
        or tokens[0] not in SUBJECT_PLANES
        or not all(EVENT_TYPE_TOKEN.fullmatch(token) for token in tokens)
    ):
        raise InvalidArgument(
            "EVENT_TYPE_INVALID",
            f"{field} must be <plane>.<kind> with a plane of {sorted(SUBJECT_PLANES)} and "
            f"at most {MAX_EVENT_TYPE_TOKENS} tokens of {EVENT_TYPE_TOKEN.pattern}",
            field,
        )


def subject_for(event_type: str, tenant_id: str) -> str:
    """ "money.entry.posted" for tenant "acme" -> "triplane.money.acme.entry.posted".

    Both parts are checked: whatever a caller put in them (a partner's event
    kind, a tenant id) can only ever name its own subject."""
    check_event_type(event_type)
    check_tenant_id(tenant_id)
    plane, _, rest = event_type.partition(".")
    return f"triplane.{plane}.{tenant_id}.{rest}"


def tenant_filter(plane: str, tenant_id: str = "") -> str:
    """The subject filter of one tenant's events of a plane (`tenant_id`
    checked), or of every tenant's (`tenant_id` empty)."""
    if tenant_id:
        check_tenant_id(tenant_id, "tenant")
    assert plane in SUBJECT_PLANES, plane
    return f"triplane.{plane}.{tenant_id or '*'}.>"


def new_event_id() -> str:
    return uuid.uuid4().hex


def make_envelope(
    *,
    event_type: str,
    tenant_id: str,
    payload: Message,
    occurred_at_us: int,
    event_id: str | None = None,
    account_id: str = "",
    idempotency_key: str = "",
    amount: types_pb2.Money | None = None,
    policy_decision: str = "",
    policy_version: str = "",
    model_score_ref: types_pb2.ModelScoreRef | None = None,
    trace_id: str = "",
) -> envelope_pb2.EventEnvelope:
    envelope = envelope_pb2.EventEnvelope(
        event_id=event_id or new_event_id(),
        event_type=event_type,
        occurred_at=codec.timestamp(occurred_at_us),
        tenant_id=tenant_id,
        account_id=account_id,
        idempotency_key=idempotency_key,
        policy_decision=policy_decision,
        policy_version=policy_version,
        trace_id=trace_id,
        payload_type=payload.DESCRIPTOR.full_name,
        payload=payload.SerializeToString(deterministic=True),
    )
    if amount is not None:
        envelope.amount.CopyFrom(amount)
    if model_score_ref is not None:
        envelope.model_score_ref.CopyFrom(model_score_ref)
    return envelope


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """A serialized envelope ready to publish."""

    event_id: str
    subject: str
    data: bytes


# Once connected, a client reconnects by itself, forever, this often.
_RECONNECT = {"allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5}


def nats_servers(url: str) -> list[str]:
    """nats.url as nats-py's server pool: one URL, or several comma-separated
    (the nodes of a JetStream cluster, so a client reaches the cluster
    whichever node is down when it connects; once connected it also learns
    the others from the server)."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("nats.url is empty")
    return servers


async def connect(config: NatsConfig, name: str, *, fail_fast: bool = False) -> NatsClient:
    """Connects; once connected, the client reconnects by itself. The caller
    owns the connection. nats-py retries a first connection forever (every
    0.5 s): with `fail_fast`, a server that cannot be reached fails the call
    at once instead, for callers that pace their own attempts with a
    RetryPolicy (the outbox relays). TLS and credentials come from the
    config (nats.tls_*, nats.creds_file, nats.user/password_file)."""
    security = nats_options(config)
    if not fail_fast:
        return await nats.connect(
            nats_servers(config.url),
            name=name,
            connect_timeout=config.connect_timeout_s,
            **_RECONNECT,
            **security,
        )
    # nats-py's fewest tries per server before it gives up are two; with no
    # wait between them that is still one quick attempt.
    client = await nats.connect(
        nats_servers(config.url),
        name=name,
        connect_timeout=config.connect_timeout_s,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        **security,
    )
    # nats-py reads these options whenever a connection drops, so from now on
    # this client reconnects by itself, as every other client does.
    client.options.update(_RECONNECT)
    return client


class StreamLimitsError(RuntimeError):
    """A stream could not be given its configured bounds (the message names
    the config keys to change)."""


def limits_key(name: str) -> str:
    """The config section of a stream: TRIPLANE_MONEY -> nats.streams.money."""
    return name.removeprefix("TRIPLANE_").lower()


def stream_config(name: str, config: NatsConfig) -> StreamConfig:
    """What a stream of the spine is made with: its subjects, the dedupe
    window and its bounds from nats.streams.<plane>."""
    limits: StreamLimitsConfig = getattr(config.streams, limits_key(name))
    return StreamConfig(
        name=name,
        subjects=STREAMS[name],
        storage=StorageType.FILE,
        num_replicas=config.stream_replicas,
        duplicate_window=float(config.dedupe_window_s),
        max_bytes=limits.max_bytes,
        max_age=float(limits.max_age_s),
        max_msg_size=limits.max_msg_bytes,
        max_msgs_per_subject=limits.max_msgs_per_subject,
        discard=DiscardPolicy(limits.discard),
    )


async def ensure_streams(
    js: JetStreamContext, config: NatsConfig, names: Sequence[str] | None = None
) -> None:
    """Creates the spine's streams with their configured bounds, or updates a
    stream that exists with other settings (an earlier release's, or before
    an operator changed nats.streams), so the bounds in config are the ones
    in force."""
    for name in names or STREAMS:
        stream = stream_config(name, config)
        try:
            try:
                await js.add_stream(stream)
            except nats.js.errors.BadRequestError:
                await js.update_stream(stream)
        except nats.js.errors.ServerError as error:
            # JetStream reserves max_bytes on disk: a server that cannot hold
            # it refuses the stream (err_code 10047).
            key = f"nats.streams.{limits_key(name)}.max_bytes"
            message = (
                f"stream {name} cannot get its bounds ({key} = {stream.max_bytes}): "
                f"{error.description}; lower {key} or give the NATS server more "
                "storage (its max_file_store)"
            )
            log.error(message)
            raise StreamLimitsError(message) from error


async def publish_batch(
    js: JetStreamContext, events: Sequence[OutgoingEvent], timeout_s: float
) -> list[bool]:
    """Publishes events concurrently; True for each one JetStream acknowledged
    (a duplicate counts as acknowledged: it is already stored)."""
    futures = []
    for event in events:
        futures.append(
            await js.publish_async(
                event.subject, event.data, headers={"Nats-Msg-Id": event.event_id}
            )
        )
    done, pending = await asyncio.wait(futures, timeout=timeout_s) if futures else (set(), set())
    for future in pending:
        future.cancel()
    results = []
    for future in futures:
        ok = future in done and not future.cancelled() and future.exception() is None
        results.append(ok)
    return results
