"""Channel adapters: every channel is an HTTP POST signed per the Standard
Webhooks specification (https://www.standardwebhooks.com).

Headers: `webhook-id` (the delivery id: the same on every attempt, so a
receiver dedupes a re-send after a crash), `webhook-timestamp` (Unix seconds
of this attempt, which the receiver checks against its replay window) and
`webhook-signature` (`v1,` + base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"
under the `whsec_` secret), computed by the `standardwebhooks` package itself.
Partner webhooks go to the URL in the delivery; push, SMS, e-mail and WhatsApp
go to their provider endpoint from config, the recipient in the body. Every
secret is read from the file config names (gateway.delivery.channels.*.
secret_path, gateway.partner_webhooks[].secret_path), never from config.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from standardwebhooks.webhooks import Webhook

from gateway.delivery.model import DeliveryRecord, SendOutcome
from triplane.runtime.config import ChannelEndpointConfig, DeliveryConfig
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.secret_files import read_secret

USER_AGENT = "triplane-gateway/1"


class ChannelAdapter(Protocol):
    async def send(self, record: DeliveryRecord, attempt_at_us: int) -> SendOutcome:
        """One attempt; never raises for a network or endpoint failure."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    secret: str


class Signer:
    """Standard Webhooks signatures, one parsed key per secret."""

    def __init__(self) -> None:
        self._keys: dict[str, Webhook] = {}

    def key(self, secret: str) -> Webhook:
        key = self._keys.get(secret)
        if key is None:
            key = self._keys[secret] = webhook_key(secret)
        return key

    def headers(self, secret: str, msg_id: str, timestamp_s: int, body: str) -> dict[str, str]:
        moment = dt.datetime.fromtimestamp(timestamp_s, dt.UTC)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp_s),
            "webhook-signature": self.key(secret).sign(msg_id, moment, body),
        }


def webhook_key(secret: str) -> Webhook:
    """A parsed `whsec_` secret; InvalidArgument when it is not one."""
    if not secret.startswith("whsec_") or len(secret) < len("whsec_") + 8:
        raise InvalidArgument("WEBHOOK_SECRET_INVALID", "a secret is 'whsec_' + base64", "secret")
    try:
        return Webhook(secret)
    except Exception as exc:
        raise InvalidArgument(
            "WEBHOOK_SECRET_INVALID", "a secret is 'whsec_' + base64", "secret"
        ) from exc


class HttpTransport:
    """One aiohttp session for all adapters, opened on first use."""

    def __init__(self, timeout_s: float, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=connector, headers={"user-agent": USER_AGENT}
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpChannelAdapter:
    def __init__(
        self,
        transport: HttpTransport,
        signer: Signer,
        resolve: Callable[[DeliveryRecord], Target],
    ) -> None:
        self._transport = transport
        self._signer = signer
        self._resolve = resolve

    async def send(self, record: DeliveryRecord, attempt_at_us: int) -> SendOutcome:
        try:
            target = self._resolve(record)
            headers = self._signer.headers(
                target.secret, record.delivery_id, attempt_at_us // 1_000_000, record.body
            )
        except InvalidArgument as exc:
            return SendOutcome(False, 0, f"{exc.reason}: {exc.message}")
        headers["content-type"] = "application/json"
        try:
            async with self._transport.session().post(
                target.url, data=record.body.encode(), headers=headers
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            return SendOutcome(False, 0, "timeout")
        except aiohttp.ClientError as exc:
            return SendOutcome(False, 0, f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return SendOutcome(True, status)
        return SendOutcome(False, status, f"HTTP {status}")

    async def aclose(self) -> None:
        await self._transport.aclose()


def build_adapters(
    config: DeliveryConfig,
    partner_secret: Callable[[str], str],
    transport: HttpTransport | None = None,
) -> dict[str, ChannelAdapter]:
    """Adapters for partner_webhook (URL from the delivery, secret by tenant
    from `partner_secret`) and for each provider channel with a URL in config."""
    transport = transport or HttpTransport(config.request_timeout_s, config.max_in_flight)
    signer = Signer()
    adapters: dict[str, ChannelAdapter] = {
        "partner_webhook": HttpChannelAdapter(
            transport, signer, lambda r: Target(r.endpoint, partner_secret(r.tenant_id))
        )
    }
    for channel, target in _provider_targets(config.channels).items():
        adapters[channel] = HttpChannelAdapter(transport, signer, _fixed(target))
    return adapters


def _fixed(target: Target) -> Callable[[DeliveryRecord], Target]:
    def resolve(_record: DeliveryRecord) -> Target:
        return target

    return resolve


def _provider_targets(channels: Mapping[str, ChannelEndpointConfig]) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for name, endpoint in channels.items():
        if not endpoint.url:
            continue
        # The secret from its file (a mounted Secret), never from config.
        secret = read_secret(endpoint.secret_path) if endpoint.secret_path else ""
        try:
            webhook_key(secret)
        except InvalidArgument as exc:
            raise exc.with_field_prefix(f"gateway.delivery.channels.{name}") from None
        targets[name] = Target(endpoint.url, secret)
    return targets
