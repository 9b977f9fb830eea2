r"""The sandbox bank's HTTP API (aiohttp).

- `GET /healthz`: 200 once serving.
- `POST /v1/instant/pacs008`: a pacs.008; answers its pacs.002 (ACSC, or
  RJCT with an ISO reason).
- `POST /v1/sepa/pain001`: a pain.001.001.09 file (202).
- `POST /v1/ach/files`: a NACHA file (202).
- `POST /v1/card/payouts`: a JSON token payout; answers its status.
- `GET /v1/outbox/<rail>?after=N`: what the bank sent that rail after
  sequence N (pacs.002, pacs.004, camt.054, NACHA return files, card
  statuses; base64 bodies); rail `statements`: every camt.054.
- `GET /v1/statements/<camt.053|camt.052|mt940>?date=YYYY-MM-DD`: that day's
  statement (default today).
- `GET /v1/truth`: the bank's own record of what it did, per payment.
- `GET /v1/clock`, `POST /v1/clock {"advance_s": N}`: the bank's time, moved
  only with `sandbox_bank.clock: manual`.

A request the bank cannot read is refused 400 with `{"reason", "message",
"field"}` (the element path or `line N` of the file), and nothing of it is
booked. One asyncio task serves everything, so the books need no locks.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from aiohttp import web

from triplane.runtime.clock import Clock, ManualClock
from triplane.runtime.config import SandboxBankConfig
from triplane.runtime.errors import InvalidArgument, TriplaneError
from triplane_sim.sandbox_bank.bank import Bank

BANK_KEY = web.AppKey("bank", Bank)
CLOCK_KEY = web.AppKey("clock", object)
RAILS = ("instant", "ach", "sepa", "card", "statements")


def _refused(exc: TriplaneError) -> web.Response:
    return web.json_response(
        {"reason": exc.reason, "message": exc.message, "field": exc.field}, status=400
    )


async def _body(request: web.Request, limit: int) -> bytes:
    data = await request.read()
    if not data:
        raise InvalidArgument("FIELD_REQUIRED", "the request has no body", "body")
    if len(data) > limit:
        raise InvalidArgument("FILE_TOO_LARGE", "the body is too large", "body")
    return data


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except TriplaneError as exc:
        return _refused(exc)


def build_app(config: SandboxBankConfig, clock: Clock) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=config.max_body_bytes + 1024)
    bank = Bank(config, clock)
    app[BANK_KEY] = bank
    limit = config.max_body_bytes

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "serving"})

    async def instant(request: web.Request) -> web.Response:
        bank.run_due()
        report = bank.receive_pacs008(await _body(request, limit))
        return web.Response(body=report, content_type="application/xml")

    async def sepa(request: web.Request) -> web.Response:
        bank.run_due()
        return web.json_response(bank.receive_pain001(await _body(request, limit)), status=202)

    async def ach(request: web.Request) -> web.Response:
        bank.run_due()
        return web.json_response(bank.receive_nacha(await _body(request, limit)), status=202)

    async def card(request: web.Request) -> web.Response:
        bank.run_due()
        try:
            body = json.loads(await _body(request, limit))
        except ValueError:
            raise InvalidArgument("JSON_INVALID", "the body is not JSON", "body") from None
        if not isinstance(body, dict):
            raise InvalidArgument("JSON_INVALID", "the body is a JSON object", "body")
        return web.json_response(bank.receive_card(body))

    async def outbox(request: web.Request) -> web.Response:
        rail = request.match_info["rail"]
        if rail not in RAILS:
            raise InvalidArgument("RAIL_UNKNOWN", f"one of {list(RAILS)}", "rail")
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            raise InvalidArgument("FIELD_INVALID", "after is an integer", "after") from None
        return web.json_response({"messages": bank.feed(rail, after)})

    async def statement(request: web.Request) -> web.Response:
        raw = request.query.get("date", "")
        try:
            day = dt.date.fromisoformat(raw) if raw else bank.today()
        except ValueError:
            raise InvalidArgument("DATE_INVALID", "date is YYYY-MM-DD", "date") from None
        kind = request.match_info["kind"]
        data = bank.statement(kind, day)
        content_type = "text/plain" if kind == "mt940" else "application/xml"
        return web.Response(body=data, content_type=content_type)

    async def truth(_: web.Request) -> web.Response:
        return web.json_response({"payments": bank.truth()})

    async def get_clock(_: web.Request) -> web.Response:
        return web.json_response({"now": bank.now().isoformat(), "now_us": clock.now_us()})

    async def move_clock(request: web.Request) -> web.Response:
        if not isinstance(clock, ManualClock):
            raise InvalidArgument(
                "CLOCK_NOT_MANUAL", "the clock moves only with sandbox_bank.clock: manual", "clock"
            )
        try:
            body = json.loads(await request.read() or b"{}")
            seconds = float(body.get("advance_s", 0))
        except (ValueError, AttributeError, TypeError):
            raise InvalidArgument("FIELD_INVALID", "advance_s is a number", "advance_s") from None
        if seconds < 0:
            raise InvalidArgument("FIELD_INVALID", "a clock never goes back", "advance_s")
        clock.advance(seconds)
        bank.run_due()
        return web.json_response({"now": bank.now().isoformat(), "now_us": clock.now_us()})

    app.router.add_get("/healthz", health)
    app.router.add_post("/v1/instant/pacs008", instant)
    app.router.add_post("/v1/sepa/pain001", sepa)
    app.router.add_post("/v1/ach/files", ach)
    app.router.add_post("/v1/card/payouts", card)
    app.router.add_get("/v1/outbox/{rail}", outbox)
    app.router.add_get("/v1/statements/{kind}", statement)
    app.router.add_get("/v1/truth", truth)
    app.router.add_get("/v1/clock", get_clock)
    app.router.add_post("/v1/clock", move_clock)
    return app


def clock_for(config: SandboxBankConfig) -> Clock:
    from triplane.runtime.clock import SystemClock

    if config.clock == "manual":
        start = dt.datetime.fromisoformat(config.manual_start)
        return ManualClock(int(start.timestamp() * 1_000_000))
    if config.clock != "system":
        raise ValueError("sandbox_bank.clock: system or manual")
    return SystemClock()
