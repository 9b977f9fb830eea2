"""Delivery values: what a caller enqueues and what the queue remembers."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

from triplane.runtime.errors import InvalidArgument
from triplane.runtime.ids import check_tenant_id

# The channels of the policy plane's consent model (policy_plane.consent.CHANNELS)
# that leave the platform; in_app is answered inline by DecideNextAction.
CHANNELS = ("partner_webhook", "push", "sms", "email", "whatsapp")
STATUSES = ("pending", "sending", "delivered", "dead")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_DEDUPE_KEY_LENGTH = 128
MAX_ENDPOINT_LENGTH = 2048


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A message to deliver once. `endpoint` is the partner's URL for
    partner_webhook and the recipient (a token, never raw PII) otherwise."""

    tenant_id: str
    channel: str
    endpoint: str
    event_type: str
    payload: dict[str, Any]
    # One delivery per (tenant, dedupe_key): a retried enqueue returns it.
    dedupe_key: str
    # Not sent before this time (0: at once).
    send_at_us: int = 0


class DeliveryRecord(msgspec.Struct, frozen=True, kw_only=True):
    delivery_id: str
    tenant_id: str
    dedupe_key: str
    channel: str
    endpoint: str
    event_type: str
    # The exact request body: every attempt sends the same bytes.
    body: str
    status: str
    attempts: int
    next_attempt_at_us: int
    created_at_us: int
    send_at_us: int
    delivered_at_us: int = 0
    dead_at_us: int = 0
    last_status_code: int = 0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What one attempt came to: delivered only on a 2xx answer."""

    delivered: bool
    status_code: int = 0
    error: str = ""


def delivery_id_for(tenant_id: str, dedupe_key: str) -> str:
    """Deterministic, so a retried enqueue (even a racing one) names the same
    message, and the id doubles as the Standard Webhooks `webhook-id`."""
    digest = hashlib.sha256(f"{tenant_id}\x1f{dedupe_key}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def encode_body(delivery: Delivery, created_at_us: int) -> str:
    """The Standard Webhooks payload shape: type, timestamp, data."""
    timestamp = dt.datetime.fromtimestamp(created_at_us / 1e6, dt.UTC)
    body: dict[str, Any] = {
        "type": delivery.event_type,
        "timestamp": timestamp.isoformat().replace("+00:00", "Z"),
        "data": delivery.payload,
    }
    if delivery.channel != "partner_webhook":
        body["channel"] = delivery.channel
        body["to"] = delivery.endpoint
    return msgspec.json.encode(body).decode()


def validate(delivery: Delivery, channels: tuple[str, ...] | list[str], max_bytes: int) -> None:
    """Raises InvalidArgument naming the first bad field."""
    check_tenant_id(delivery.tenant_id)
    if delivery.channel not in channels:
        raise InvalidArgument(
            "CHANNEL_UNSUPPORTED",
            f"channel {delivery.channel!r} has no adapter (have {', '.join(channels)})",
            "channel",
        )
    _check_endpoint(delivery)
    if not _EVENT_TYPE.fullmatch(delivery.event_type):
        raise InvalidArgument(
            "EVENT_TYPE_INVALID", "event_type must match [A-Za-z0-9_.-]{1,64}", "event_type"
        )
    if not delivery.dedupe_key or len(delivery.dedupe_key) > MAX_DEDUPE_KEY_LENGTH:
        raise InvalidArgument(
            "DEDUPE_KEY_INVALID",
            f"dedupe_key must be 1..{MAX_DEDUPE_KEY_LENGTH} characters",
            "dedupe_key",
        )
    if delivery.send_at_us < 0:
        raise InvalidArgument("SEND_AT_INVALID", "send_at_us must not be negative", "send_at_us")
    if len(msgspec.json.encode(delivery.payload)) > max_bytes:
        raise InvalidArgument("PAYLOAD_TOO_LARGE", f"payload is over {max_bytes} bytes", "payload")


def _check_endpoint(delivery: Delivery) -> None:
    endpoint = delivery.endpoint
    if not endpoint or len(endpoint) > MAX_ENDPOINT_LENGTH:
        raise InvalidArgument(
            "ENDPOINT_INVALID", f"endpoint must be 1..{MAX_ENDPOINT_LENGTH} characters", "endpoint"
        )
    if delivery.channel == "partner_webhook":
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidArgument("ENDPOINT_INVALID", "endpoint must be an http(s) URL", "endpoint")
