"""The Cases page's human-overrule rate over time: in chromium against a
running policy plane, a risk_admin reads today's counts as the plane's
GetOverruleSeries has them after one case resolved against the model's
suggestion and one as suggested, with the SVG chart; through TestClient, a
bad window is 400 naming window_days and roles without cases:read are
refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Page, expect
from starlette.testclient import TestClient

from triplane.policy.v1 import policy_pb2 as pb
from triplane.policy.v1 import policy_pb2_grpc
from triplane.runtime import codec as wire

from .conftest import TENANT, ConsoleUnderTest, console_client, shot, sign_in_as, signed_in
from .test_auth import make_config

DAY_US = 86_400_000_000


async def _today(console: ConsoleUnderTest) -> pb.OverruleBucket:
    """Today's bucket (UTC) as the plane counts it, asked as the admin."""
    today = console.clock.now_us() // DAY_US * DAY_US
    async with console.stack.channel("policy") as channel:
        answer = await policy_pb2_grpc.CaseServiceStub(channel).GetOverruleSeries(
            pb.GetOverruleSeriesRequest(
                tenant_id=TENANT,
                start_time=wire.timestamp(today),
                end_time=wire.timestamp(today + DAY_US),
            ),
            timeout=10,
        )
    bucket: pb.OverruleBucket = answer.buckets[0]
    return bucket


async def _resolve(
    console: ConsoleUnderTest, case_id: str, resolution: pb.Resolution.ValueType
) -> None:
    async with console.stack.channel("policy") as channel:
        cases = policy_pb2_grpc.CaseServiceStub(channel)
        await cases.ClaimCase(
            pb.ClaimCaseRequest(tenant_id=TENANT, case_id=case_id, reviewer="rita"), timeout=10
        )
        await cases.ResolveCase(
            pb.ResolveCaseRequest(
                tenant_id=TENANT,
                case_id=case_id,
                reviewer="rita",
                resolution=resolution,
                note="checked",
            ),
            timeout=10,
        )


async def test_risk_admin_reads_todays_overrule_rate(console: ConsoleUnderTest, page: Page) -> None:
    # The console's clock started with the session; the plane resolves at
    # the wall clock's now: bring the console to the same day.
    console.clock.set_us(max(console.clock.now_us(), time.time_ns() // 1000))
    before = await _today(console)
    # Both scored 0.8: the model suggests decline. Approving overrules it.
    overruled = await console.review_case("overrule-approve")
    kept = await console.review_case("overrule-decline")
    await _resolve(console, overruled.case_id, pb.RESOLUTION_APPROVE)
    await _resolve(console, kept.case_id, pb.RESOLUTION_DECLINE)
    after = await _today(console)
    assert after.with_suggestion == before.with_suggestion + 2
    assert after.overruled == before.overruled + 1

    await signed_in(page, "rosa")
    await page.goto(f"/cases?tenant={TENANT}&status=resolved&window_days=7")
    section = page.get_by_test_id("overrule")
    await expect(section.get_by_role("heading", name="Human-overrule rate")).to_be_visible()
    day = wire.micros(after.start, "start") // 1_000_000
    row = section.locator(f'tr[data-day="{time.strftime("%Y-%m-%d", time.gmtime(day))}"]')
    cells = await row.locator("td").all_inner_texts()
    assert cells[1:4] == [str(after.resolved), str(after.with_suggestion), str(after.overruled)]
    assert cells[4] == f"{after.overrule_rate * 100:.1f}%"
    chart = section.locator("svg.chart")
    await expect(chart).to_have_count(1)
    title = await chart.locator(":scope > title").text_content()
    assert title == f"Human-overrule rate per day, last 7 days ({TENANT})"
    # Today's bar, with its counts; a day without a suggestion has none.
    label = time.strftime("%m-%d", time.gmtime(day))
    bar = chart.locator(f'g.share[data-label="{label}"]')
    await expect(bar.locator("title")).to_have_text(
        f"{label}: {after.overruled}/{after.with_suggestion}"
    )
    await expect(chart.locator("g.share")).to_have_count(
        await section.locator("tr[data-day]").count()
    )
    await expect(page.get_by_label("Overrule rate over (days)")).to_have_value("7")
    await shot(page, "cases-overrule")


USERS = {"rita": "reviewer", "fina": "finance_operator", "sam": "sre"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = make_config(tmp_path, session_idle_s=600.0, session_absolute_s=3600.0)
    users = {name: [role] for name, role in USERS.items()}
    with console_client(config, users) as test_client:
        yield test_client


def test_a_bad_window_is_refused_naming_it(client: TestClient) -> None:
    sign_in_as(client, "rita")
    answer = client.get(f"/cases?tenant={TENANT}&window_days=365")
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == "FILTER_INVALID"
    assert answer.headers["x-triplane-field"] == "window_days"
    # Without a tenant the page asks for one, the window select labelled.
    page = client.get("/cases")
    assert page.status_code == 200
    assert '<label for="window_days">' in page.text and 'id="window_days"' in page.text


@pytest.mark.parametrize("username", ["fina", "sam"])
def test_roles_without_cases_read_are_refused(client: TestClient, username: str) -> None:
    sign_in_as(client, username)
    answer = client.get(f"/cases?tenant={TENANT}&window_days=30")
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
