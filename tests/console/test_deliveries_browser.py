"""The Deliveries page in a real browser (Debian's chromium, Playwright)
against a running gateway: its delivery worker sends a partner webhook to a
real HTTP endpoint that fails until the delivery runs out of attempts; the
console, as its own certificate identity on the gateway's certificate port
(gateway.admin_listen), shows the endpoint, the attempts and the dead
letter; an SRE redelivers it, it leaves the dead-letter list and, the
endpoint back, is delivered. A finance operator has no Deliveries page and
cannot redeliver; the gateway's DeliveryAdminService refuses the console's
identity on the port that does not ask for certificates, and refuses a
certificate it does not know on the one that does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from playwright.async_api import Browser, Page, expect

from console.store import ConsoleStore
from gateway.app import Gateway
from gateway.delivery import Delivery
from tests.gateway._b_helpers import Receiver, receiver, secret_file
from tests.tls_helpers import channel_as, dev_certificates, partner_files
from triplane.gateway.v1 import delivery_admin_pb2 as pb
from triplane.gateway.v1 import delivery_admin_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import CONSOLE, GATEWAY, open_channel

from .conftest import accessibility_problems, browser_page, serve_console, shot, signed_in

TENANT = "hooks-acme"
USERS = {"sam": ["sre"], "fina": ["finance_operator"], "aldo": ["auditor"]}
# Bounds on waiting for the gateway's worker (not timing assertions).
SETTLE_WITHIN_S = 30.0


@dataclass
class DeliveriesConsole:
    config: Config
    gateway: Gateway
    public_address: str
    admin_address: str
    url: str
    store: ConsoleStore
    hook: Receiver

    def admin_channel(self, identity: str = CONSOLE) -> grpc.aio.Channel:
        return channel_as(self.config.state_path, self.admin_address, identity)

    async def delivery(self, delivery_id: str) -> pb.DeliveryRecord:
        async with self.admin_channel() as channel:
            answer = await delivery_admin_pb2_grpc.DeliveryAdminServiceStub(channel).GetDelivery(
                pb.GetDeliveryRequest(tenant_id=TENANT, delivery_id=delivery_id), timeout=10
            )
        record: pb.DeliveryRecord = answer.delivery
        return record

    async def settle(
        self, delivery_id: str, done: Callable[[pb.DeliveryRecord], bool]
    ) -> pb.DeliveryRecord:
        """The delivery once the gateway's worker brought it to `done`."""
        deadline = time.monotonic() + SETTLE_WITHIN_S
        while True:
            record = await self.delivery(delivery_id)
            if done(record):
                return record
            assert time.monotonic() < deadline, f"the worker left it {record.status}"
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def deliveries_console(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[DeliveriesConsole]:
    state_dir = tmp_path_factory.mktemp("deliveries-console")
    dev_certificates(state_dir)
    admin_address = f"127.0.0.1:{free_port()}"
    console_port = free_port()
    async with receiver() as hook:
        hook.default = (500, 0.0)
        config = load_config(
            environ={},
            overrides={
                "runtime": {"state_dir": str(state_dir), "log_format": "text"},
                "nats": {"url": ""},
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "admin_listen": admin_address,
                    "partner_webhooks": [
                        {
                            "tenant_id": TENANT,
                            "url": f"{hook.url}/hooks",
                            "secret_path": secret_file(),
                        }
                    ],
                    "delivery": {
                        "retry": {
                            "initial_interval_s": 0.05,
                            "backoff_coefficient": 1.0,
                            "maximum_interval_s": 0.05,
                            "maximum_attempts": 3,
                            "jitter_s": 0.0,
                        },
                        "request_timeout_s": 2.0,
                        "poll_interval_s": 0.05,
                    },
                },
                "console": {"listen": f"127.0.0.1:{console_port}"},
            },
        )
        gateway = Gateway(
            config,
            SystemClock(),
            money_address=f"127.0.0.1:{free_port()}",
            policy_address=f"127.0.0.1:{free_port()}",
            ai_address=f"127.0.0.1:{free_port()}",
        )
        public_address = f"127.0.0.1:{await gateway.start()}"
        try:
            async with serve_console(config, USERS, "deliveries-console") as running:
                yield DeliveriesConsole(
                    config,
                    gateway,
                    public_address,
                    admin_address,
                    running.url,
                    running.store,
                    hook,
                )
        finally:
            await gateway.stop()


async def _dead_letter(setup: DeliveriesConsole, key: str) -> str:
    """A partner webhook the gateway's worker sends until it is dead."""
    engagement = setup.gateway.engagement
    assert engagement is not None
    setup.hook.default = (500, 0.0)
    record = await engagement.delivery.enqueue(
        Delivery(
            tenant_id=TENANT,
            channel="partner_webhook",
            endpoint=f"{setup.hook.url}/hooks",
            event_type="payout.failed",
            payload={"payout_id": key},
            dedupe_key=key,
        )
    )
    dead = await setup.settle(record.delivery_id, lambda d: d.status == "dead")
    assert dead.attempts == 3 and dead.last_status_code == 500
    return record.delivery_id


@pytest.fixture
async def page(browser: Browser, deliveries_console: DeliveriesConsole) -> AsyncIterator[Page]:
    async with browser_page(browser, deliveries_console.url) as opened:
        yield opened


async def _csrf(page: Page) -> str:
    headers = await page.locator("body").get_attribute("hx-headers")
    assert headers
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', headers)
    assert found
    return found.group(1)


async def test_sre_redelivers_a_dead_letter(
    deliveries_console: DeliveriesConsole, page: Page
) -> None:
    delivery_id = await _dead_letter(deliveries_console, "payout-po-1")
    await signed_in(page, "sam")
    await page.get_by_role("link", name="Deliveries").click()
    await page.get_by_label("Tenant").fill(TENANT)
    await page.get_by_role("button", name="Show").click()
    endpoint = page.locator(f'tr[data-endpoint="{deliveries_console.hook.url}/hooks"]')
    await expect(endpoint).to_contain_text("HTTP 500")
    dead = page.get_by_test_id("dead-letters").locator(f'tr[data-delivery-id="{delivery_id}"]')
    await expect(dead).to_contain_text("payout.failed")
    await expect(dead.locator("td").nth(5)).to_have_text("3")
    await shot(page, "dead-letter")
    assert not await accessibility_problems(page, page.url)

    deliveries_console.hook.default = (200, 0.0)
    await dead.get_by_role("button", name="Redeliver").click()
    await page.wait_for_load_state()
    await expect(
        page.get_by_test_id("dead-letters").locator(f'tr[data-delivery-id="{delivery_id}"]')
    ).to_have_count(0)
    await shot(page, "redelivered")

    # The gateway has it back on the queue, and its worker delivers it.
    delivered = await deliveries_console.settle(delivery_id, lambda d: d.status == "delivered")
    assert delivered.attempts == 1
    async with deliveries_console.admin_channel() as channel:
        listed = await delivery_admin_pb2_grpc.DeliveryAdminServiceStub(channel).ListDeliveries(
            pb.ListDeliveriesRequest(tenant_id=TENANT, status="dead"), timeout=10
        )
    assert delivery_id not in {d.delivery_id for d in listed.deliveries}
    audited = [
        e
        for e in deliveries_console.store.audit_entries(50, actor="sam")
        if e.action == "delivery.redeliver"
    ]
    assert len(audited) == 1 and audited[0].outcome == "ok"
    assert audited[0].before["status"] == "dead" and audited[0].before["attempts"] == 3
    assert audited[0].after["status"] == "pending"
    await page.reload()
    row = page.get_by_test_id("deliveries").locator(f'tr[data-delivery-id="{delivery_id}"]')
    await expect(row).to_contain_text("delivered")
    await shot(page, "delivered")


async def test_finance_operator_cannot_redeliver_and_auditor_only_reads(
    deliveries_console: DeliveriesConsole, browser: Browser
) -> None:
    delivery_id = await _dead_letter(deliveries_console, "payout-po-2")
    path = f"/deliveries/{TENANT}/{delivery_id}/redeliver"
    async with browser_page(browser, deliveries_console.url) as page:
        await signed_in(page, "fina")
        await expect(page.get_by_role("link", name="Deliveries")).to_have_count(0)
        seen = await page.goto(f"/deliveries?tenant={TENANT}")
        assert seen is not None and seen.status == 403
        answer = await page.request.post(path, form={"csrf_token": await _csrf(page)})
        assert answer.status == 403
        assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    async with browser_page(browser, deliveries_console.url) as page:
        await signed_in(page, "aldo")
        await page.goto(f"/deliveries?tenant={TENANT}")
        row = page.get_by_test_id("dead-letters").locator(f'tr[data-delivery-id="{delivery_id}"]')
        await expect(row).to_contain_text("payout.failed")
        await expect(page.get_by_role("button", name="Redeliver")).to_have_count(0)
        await shot(page, "auditor")
        answer = await page.request.post(path, form={"csrf_token": await _csrf(page)})
        assert answer.status == 403
    assert (await deliveries_console.delivery(delivery_id)).status == "dead"


async def _refused(call: Awaitable[object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    reason, field = parse_rpc_error(caught.value)
    return caught.value.code(), reason, field


async def test_the_gateway_admits_the_console_only_by_its_certificate(
    deliveries_console: DeliveriesConsole,
) -> None:
    setup = deliveries_console
    request = pb.ListDeliveriesRequest(tenant_id=TENANT)
    # The public port asks no certificate: the console is not known there.
    async with open_channel(
        setup.public_address, partner_files(setup.config.state_path)
    ) as channel:
        code, reason, _ = await _refused(
            delivery_admin_pb2_grpc.DeliveryAdminServiceStub(channel).ListDeliveries(
                request, timeout=10
            )
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # The certificate port knows the gateway's own certificate, which is no
    # operator.
    async with setup.admin_channel(GATEWAY) as channel:
        code, reason, _ = await _refused(
            delivery_admin_pb2_grpc.DeliveryAdminServiceStub(channel).ListDeliveries(
                request, timeout=10
            )
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # The console names the tenant, and the request is checked like any other.
    async with setup.admin_channel() as channel:
        stub = delivery_admin_pb2_grpc.DeliveryAdminServiceStub(channel)
        code, reason, field = await _refused(
            stub.ListDeliveries(pb.ListDeliveriesRequest(), timeout=10)
        )
        assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "tenant_id")
        code, reason, field = await _refused(
            stub.ListDeliveries(pb.ListDeliveriesRequest(tenant_id=TENANT, status="x"), timeout=10)
        )
        assert (code, reason, field) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "STATUS_INVALID",
            "status",
        )
        code, reason, field = await _refused(
            stub.ListDeliveries(
                pb.ListDeliveriesRequest(tenant_id=TENANT, page_token="nope"), timeout=10
            )
        )
        assert (reason, field) == ("PAGE_TOKEN_INVALID", "page_token")
        code, reason, _ = await _refused(
            stub.RequeueDelivery(
                pb.RequeueDeliveryRequest(tenant_id=TENANT, delivery_id="msg_nope"), timeout=10
            )
        )
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "DELIVERY_NOT_FOUND")
        # Its key-management methods stay the admin's.
        from triplane.gateway.v1 import gateway_pb2, gateway_pb2_grpc

        code, _, _ = await _refused(
            gateway_pb2_grpc.ApiKeyServiceStub(channel).ListApiKeys(
                gateway_pb2.ListApiKeysRequest(tenant_id=TENANT), timeout=10
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
