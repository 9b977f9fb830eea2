"""The Experiments page and the gateway's ExperimentAdminService behind it,
against a running gateway holding a simulated population whose true uplift
is known (tests/gateway/test_measure.py's simulate: cashback adds 3 points
of conversion, savings none): GetLiftReport as the console's certificate
identity on the gateway's certificate port answers what the measurement
computes, per offer and surface with each offer's total; bad windows and a
missing tenant are refused naming the field; a risk_admin sees the lift chart
and table in chromium; a reviewer has no Experiments page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from playwright.async_api import Browser, Page, expect

from gateway.app import Gateway
from gateway.experiments_admin import DIMENSIONS
from tests.gateway.test_measure import T0, TENANT, simulate
from tests.tls_helpers import channel_as, dev_certificates
from triplane.gateway.v1 import experiments_admin_pb2 as pb
from triplane.gateway.v1 import experiments_admin_pb2_grpc
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import CONSOLE

from .conftest import browser_page, serve_console, shot, signed_in

USERS = {"rosa": ["risk_admin"], "rita": ["reviewer"]}


@dataclass
class ExperimentsConsole:
    config: Config
    gateway: Gateway
    admin_address: str
    url: str

    def stub(
        self,
    ) -> tuple[grpc.aio.Channel, experiments_admin_pb2_grpc.ExperimentAdminServiceStub]:
        channel = channel_as(self.config.state_path, self.admin_address, CONSOLE)
        return channel, experiments_admin_pb2_grpc.ExperimentAdminServiceStub(channel)


@pytest.fixture(scope="module")
async def experiments_console(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ExperimentsConsole]:
    state_dir = tmp_path_factory.mktemp("experiments-console")
    dev_certificates(state_dir)
    admin_address = f"127.0.0.1:{free_port()}"
    console_port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_format": "text"},
            "nats": {"url": ""},
            "gateway": {"listen": "127.0.0.1:0", "admin_listen": admin_address},
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
    await gateway.start()
    try:
        assert gateway.engagement is not None
        await simulate(gateway.engagement.measurement.measurement, seed=5)
        async with serve_console(config, USERS, "experiments-console") as running:
            yield ExperimentsConsole(config, gateway, admin_address, running.url)
    finally:
        await gateway.stop()


def stamp(us: int) -> Timestamp:
    value = Timestamp()
    value.FromMicroseconds(us)
    return value


async def test_the_lift_report_is_the_measurements(
    experiments_console: ExperimentsConsole,
) -> None:
    setup = experiments_console
    assert setup.gateway.engagement is not None
    measured = await setup.gateway.engagement.measurement.measurement.lift_report(
        TENANT, dims=DIMENSIONS
    )
    channel, stub = setup.stub()
    async with channel:
        answer = await stub.GetLiftReport(pb.GetLiftReportRequest(tenant_id=TENANT), timeout=30)
    assert answer.tenant_id == TENANT and answer.confidence_level == measured.confidence_level
    got = {(r.offer_id, r.surface): r for r in answer.rows}
    assert set(got) == {(r.offer_id, r.surface) for r in measured.rows}
    # Per offer and surface, each offer over its surfaces, and all together.
    assert {("cashback", "checkout"), ("cashback", "*"), ("*", "*")} <= set(got)
    for row in measured.rows:
        sent = got[(row.offer_id, row.surface)]
        assert (sent.treatment.customers, sent.treatment.conversions) == (
            row.treatment.customers,
            row.treatment.conversions,
        )
        assert (sent.lift, sent.lift_low, sent.lift_high) == (
            row.lift,
            row.lift_low,
            row.lift_high,
        )
        assert sent.significant == row.significant
    # The known uplift: cashback's interval is above zero, savings' spans it.
    assert got[("cashback", "*")].lift_low > 0 and got[("cashback", "*")].significant
    assert got[("savings", "*")].lift_low < 0 < got[("savings", "*")].lift_high


async def test_bad_lift_requests_name_the_field(experiments_console: ExperimentsConsole) -> None:
    channel, stub = experiments_console.stub()
    async with channel:
        cases = [
            (pb.GetLiftReportRequest(), "FIELD_REQUIRED", "tenant_id"),
            (
                pb.GetLiftReportRequest(tenant_id=TENANT, since=stamp(T0), until=stamp(T0)),
                "WINDOW_INVALID",
                "since",
            ),
        ]
        for request, reason, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLiftReport(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert parse_rpc_error(caught.value) == (reason, field)
        # A window before every exposure: no row.
        early = await stub.GetLiftReport(
            pb.GetLiftReportRequest(tenant_id=TENANT, until=stamp(T0 - 1)), timeout=10
        )
        assert not [r for r in early.rows if r.treatment.customers or r.holdout.customers]


@pytest.fixture
async def page(browser: Browser, experiments_console: ExperimentsConsole) -> AsyncIterator[Page]:
    async with browser_page(browser, experiments_console.url) as opened:
        yield opened


async def test_a_risk_admin_reads_the_lift_chart(page: Page) -> None:
    await signed_in(page, "rosa")
    await page.goto("/experiments")
    await page.get_by_label("Tenant").fill(TENANT)
    await page.get_by_role("button", name="Show").click()
    cashback = page.locator('tr[data-offer="cashback"][data-surface="*"]')
    await expect(cashback).to_contain_text("significant")
    chart = page.locator("svg.chart")
    await expect(chart.locator('g[data-label="cashback / all surfaces"]')).to_have_count(1)
    await expect(chart.locator('g[data-label="all offers / all surfaces"]')).to_have_count(1)
    await shot(page, "experiments")


async def test_a_reviewer_has_no_experiments_page(page: Page) -> None:
    await signed_in(page, "rita")
    await expect(page.get_by_role("link", name="Experiments")).to_have_count(0)
    answer = await page.request.get(f"/experiments?tenant={TENANT}", max_redirects=0)
    assert answer.status == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
