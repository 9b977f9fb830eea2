"""Ledger (money plane LedgerService), read-only: the tenants (ListTenants,
paged); a tenant's accounts with their balances (ListAccounts, paged); one
account's balance (posted, pending, available) now or posted as of a chosen
instant (GetBalance as_of), and its postings a page at a time
(ListAccountPostings); a hold and its state (GetHold); an entry by its id or
its idempotency key (GetEntry).

Who: `money:read`, held by finance_operator, sre and auditor; reviewer and
risk_admin do not see the ledger. Nothing here moves money: the console holds
no money state and calls no method that writes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.actions import BadFilter, filter_error_page, next_page_link, text_filter
from console.app import console_of, error_page, grpc_error_page, render
from console.auth import Session, requires
from console.pages import Page
from console.pages.decisions import utc_timestamp
from triplane.money.v1 import money_pb2 as pb
from triplane.runtime.currencies import format_minor

MAX_FIELD_LENGTH = 128


def account_path(tenant: str, account_id: str) -> str:
    return f"/ledger/{quote(tenant, safe='')}/accounts/{quote(account_id, safe='')}"


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _context(**values: Any) -> dict[str, Any]:
    return {
        "account_path": account_path,
        "enum_name": enum_name,
        "minor": format_minor,
        "pb": pb,
        **values,
    }


@requires("money:read")
async def accounts(request: Request, session: Session) -> Response:
    console = console_of(request)
    params = dict(request.query_params)
    try:
        tenant = text_filter(params, "tenant", MAX_FIELD_LENGTH)
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    listed: list[pb.Account] = []
    tenants: list[pb.Tenant] = []
    next_link = ""
    if not tenant:
        try:
            found = await console.planes.ledger().ListTenants(
                pb.ListTenantsRequest(
                    page_size=console.config.console.page_size,
                    page_token=params.get("page_token", ""),
                ),
                timeout=console.planes.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        tenants = list(found.tenants)
        next_link = next_page_link("/ledger", {}, found.next_page_token)
    else:
        try:
            answer = await console.planes.ledger().ListAccounts(
                pb.ListAccountsRequest(
                    tenant_id=tenant,
                    page_size=console.config.console.page_size,
                    page_token=params.get("page_token", ""),
                ),
                timeout=console.planes.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return grpc_error_page(request, session, error)
        listed = list(answer.accounts)
        next_link = next_page_link("/ledger", {"tenant": tenant}, answer.next_page_token)
    return render(
        request,
        session,
        "ledger/accounts.html",
        _context(tenant=tenant, tenants=tenants, accounts=listed, next_link=next_link),
    )


@requires("money:read")
async def account(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    account_id = request.path_params["account_id"]
    raw_as_of = request.query_params.get("as_of", "").strip()
    as_of = utc_timestamp(raw_as_of) if raw_as_of else None
    if raw_as_of and as_of is None:
        return error_page(
            request,
            session,
            400,
            "AS_OF_INVALID",
            "as_of must be a UTC time like 2026-12-06T14:00",
            "as_of",
        )
    page_token = request.query_params.get("page_token", "")
    ledger = console.planes.ledger()
    timeout = console.planes.timeout_s
    try:
        found = await ledger.GetAccount(
            pb.GetAccountRequest(tenant_id=tenant, account_id=account_id), timeout=timeout
        )
        historic = None
        if as_of is not None:
            historic = (
                await ledger.GetBalance(
                    pb.GetBalanceRequest(tenant_id=tenant, account_id=account_id, as_of=as_of),
                    timeout=timeout,
                )
            ).balance
        postings = await ledger.ListAccountPostings(
            pb.ListAccountPostingsRequest(
                tenant_id=tenant,
                account_id=account_id,
                page_size=console.config.console.page_size,
                page_token=page_token,
            ),
            timeout=timeout,
        )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    next_link = next_page_link(
        account_path(tenant, account_id), {"as_of": raw_as_of}, postings.next_page_token
    )
    return render(
        request,
        session,
        "ledger/account.html",
        _context(
            tenant=tenant,
            account=found.account,
            historic=historic,
            as_of=raw_as_of,
            postings=list(postings.postings),
            next_link=next_link,
        ),
    )


@requires("money:read")
async def hold(request: Request, session: Session) -> Response:
    console = console_of(request)
    tenant = request.path_params["tenant"]
    # By path (a link) or by the lookup form's query (works without JavaScript).
    hold_id = request.path_params.get("hold_id") or request.query_params.get("hold_id", "")
    try:
        answer = await console.planes.ledger().GetHold(
            pb.GetHoldRequest(tenant_id=tenant, hold_id=hold_id.strip()),
            timeout=console.planes.timeout_s,
        )
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    return render(request, session, "ledger/hold.html", _context(tenant=tenant, hold=answer.hold))


@requires("money:read")
async def entry(request: Request, session: Session) -> Response:
    """An entry by `entry_id` or by `idempotency_key` (exactly one; the
    money plane refuses otherwise, naming the field)."""
    console = console_of(request)
    tenant = request.path_params["tenant"]
    params = dict(request.query_params)
    try:
        entry_id = text_filter(params, "entry_id", MAX_FIELD_LENGTH)
        key = text_filter(params, "idempotency_key", MAX_FIELD_LENGTH)
        answer = await console.planes.ledger().GetEntry(
            pb.GetEntryRequest(tenant_id=tenant, entry_id=entry_id, idempotency_key=key),
            timeout=console.planes.timeout_s,
        )
    except BadFilter as bad:
        return filter_error_page(request, session, bad)
    except grpc.aio.AioRpcError as error:
        return grpc_error_page(request, session, error)
    return render(
        request, session, "ledger/entry.html", _context(tenant=tenant, entry=answer.entry)
    )


PAGE = Page(
    label="Ledger",
    path="/ledger",
    permission="money:read",
    order=40,
    routes=[
        Route("/ledger", accounts, methods=["GET"]),
        Route("/ledger/{tenant}/accounts/{account_id}", account, methods=["GET"]),
        Route("/ledger/{tenant}/hold", hold, methods=["GET"]),
        Route("/ledger/{tenant}/holds/{hold_id}", hold, methods=["GET"]),
        Route("/ledger/{tenant}/entry", entry, methods=["GET"]),
    ],
)
