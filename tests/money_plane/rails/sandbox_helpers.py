"""A small client of the sandbox bank's HTTP API, and payouts to send."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from triplane.runtime.clock import ManualClock
from triplane.runtime.config import RailsConfig


@dataclass(frozen=True)
class Sub:
    """A payout as the payouts package hands it (RailSubmission's fields)."""

    tenant_id: str
    payout_id: str
    end_to_end_id: str
    amount_minor: int
    currency: str
    beneficiary_kind: str
    holder_name: str
    country: str = ""
    rail: str = ""
    iban: str = ""
    bic: str = ""
    routing_number: str = ""
    account_number: str = ""
    account_type: str = ""
    token: str = ""
    description: str = ""

    def with_(self, **changes: Any) -> Sub:
        return replace(self, **changes)


def e2e(n: int, salt: str = "") -> str:
    return "TP" + hashlib.sha256(f"{salt}{n}".encode()).hexdigest()[:24].upper()


def us_payout(n: int, amount: int = 12_345, salt: str = "", **kw: Any) -> Sub:
    return Sub(
        tenant_id="t1",
        payout_id=f"po_{n}",
        end_to_end_id=e2e(n, salt),
        amount_minor=amount,
        currency="USD",
        beneficiary_kind="us_bank",
        holder_name=f"Seller {n}",
        country="US",
        routing_number="011000015",
        account_number=f"9876{n:05d}",
        account_type="checking",
        description=f"payout {n}",
    ).with_(**kw)


def eur_payout(n: int, amount: int = 50_000, salt: str = "", **kw: Any) -> Sub:
    return Sub(
        tenant_id="t1",
        payout_id=f"po_{n}",
        end_to_end_id=e2e(n, salt),
        amount_minor=amount,
        currency="EUR",
        beneficiary_kind="iban",
        holder_name=f"Händler {n}",
        country="DE",
        iban="DE89370400440532013000",
        bic="COBADEFFXXX",
        description=f"payout {n}",
    ).with_(**kw)


def card_payout(n: int, amount: int = 2_500, salt: str = "") -> Sub:
    return Sub(
        tenant_id="t1",
        payout_id=f"po_{n}",
        end_to_end_id=e2e(n, salt),
        amount_minor=amount,
        currency="USD",
        beneficiary_kind="card",
        holder_name=f"Seller {n}",
        token=f"tok_card_{n:08d}",
    )


def rails_config(url: str) -> RailsConfig:
    return RailsConfig(bank_url=url)


class BankClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession()

    async def aclose(self) -> None:
        await self.session.close()

    async def get(self, path: str) -> bytes:
        async with self.session.get(self.url + path) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    async def json(self, path: str) -> Any:
        async with self.session.get(self.url + path) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def post(self, path: str, data: bytes) -> tuple[int, Any]:
        async with self.session.post(self.url + path, data=data) as resp:
            return resp.status, await resp.json(content_type=None)

    async def advance(self, days: float) -> dt.datetime:
        async with self.session.post(
            self.url + "/v1/clock", json={"advance_s": days * 86_400}
        ) as resp:
            assert resp.status == 200, await resp.text()
            return dt.datetime.fromisoformat((await resp.json())["now"])

    async def now_us(self) -> int:
        return int((await self.json("/v1/clock"))["now_us"])

    async def clock(self) -> ManualClock:
        """A clock for the adapters that reads what the bank's says now."""
        return ManualClock(await self.now_us())

    async def truth(self) -> dict[str, dict[str, Any]]:
        found = await self.json("/v1/truth")
        return {p["end_to_end_id"]: p for p in found["payments"]}

    async def statement(self, kind: str, day: dt.date | None = None) -> bytes:
        query = f"?date={day.isoformat()}" if day else ""
        return await self.get(f"/v1/statements/{kind}{query}")

    async def feed(self, rail: str) -> list[tuple[str, bytes]]:
        found = await self.json(f"/v1/outbox/{rail}?after=0")
        return [(m["kind"], base64.b64decode(m["body"])) for m in found["messages"]]
