"""Channel delivery: a persistent queue (SQLite or PostgreSQL), signed HTTP
adapters (Standard Webhooks), retries with backoff, a dead-letter queue."""

from __future__ import annotations

from collections.abc import Callable

from gateway.delivery.adapters import (
    ChannelAdapter,
    HttpChannelAdapter,
    HttpTransport,
    Signer,
    Target,
    build_adapters,
    webhook_key,
)
from gateway.delivery.model import CHANNELS, Delivery, DeliveryRecord, SendOutcome
from gateway.delivery.store import DeliveryStore
from gateway.delivery.worker import DeliveryWorker
from triplane.runtime.clock import Clock
from triplane.runtime.config import DeliveryConfig
from triplane.runtime.db import Database

__all__ = [
    "CHANNELS",
    "ChannelAdapter",
    "Delivery",
    "DeliveryRecord",
    "DeliveryStore",
    "DeliveryWorker",
    "HttpChannelAdapter",
    "HttpTransport",
    "SendOutcome",
    "Signer",
    "Target",
    "build_adapters",
    "build_delivery_worker",
    "webhook_key",
]


def build_delivery_worker(
    db: Database,
    config: DeliveryConfig,
    clock: Clock,
    partner_secret: Callable[[str], str],
) -> DeliveryWorker:
    """The worker on `db` with the HTTP adapters from `config`;
    `partner_secret(tenant_id)` gives a tenant's `whsec_` webhook secret."""
    return DeliveryWorker(DeliveryStore(db), config, clock, build_adapters(config, partner_secret))
