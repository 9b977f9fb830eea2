"""The Models and Bundles pages against running policy and AI planes (a Stack;
the AI plane serves through its own tritonserver), in Debian's chromium: an
sre promotes a trained version and rolls it back, and the AI plane's
GetModelVersion and its scores show the older version live again; a
risk_admin reads the diff of two bundles (the changed rule) and activates
one, the plane's live bundle is it; a reviewer sees no switch and a forged
activation is refused. Every switch is audited with its reason."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, expect

from policy_plane.bundle import shipped_default_path
from tests.ai_plane.ai_helpers import TEST_AI, payment, require_triton
from triplane.ai.v1 import ai_pb2, ai_pb2_grpc
from triplane.policy.v1 import policy_pb2 as pb
from triplane.policy.v1 import policy_pb2_grpc
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane_tools.models import write_datasets
from triplane_tools.stack import Stack

from .conftest import (
    PASSWORD,
    ConsoleUnderTest,
    accessibility_problems,
    browser_page,
    clean_env,
    serve_console,
    shot,
)

MODEL = "payment_risk"
# The second training's dataset seed (the bootstrap trained v1 on ai.models.seed).
SEED = 8
USERS = {"sam": ["sre"], "rosa": ["risk_admin"], "rita": ["reviewer"], "aldo": ["auditor"]}
POSSIBLE_MATCH = """  - id: sanctions_possible_match
    when: sanctions.possible_match
    outcome: review
"""


@pytest.fixture(scope="module")
async def planes_console(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ConsoleUnderTest]:
    """Policy and AI planes (a Stack) and the console in this process."""
    require_triton()
    state_dir = tmp_path_factory.mktemp("console-planes")
    console_port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "policy": {"listen": f"127.0.0.1:{free_port()}"},
            "ai": {**TEST_AI, "listen": f"127.0.0.1:{free_port()}"},
            "console": {"listen": f"127.0.0.1:{console_port}"},
        },
    )
    async with (
        Stack(config, planes=["policy", "ai"], environ=clean_env()) as stack,
        serve_console(config, USERS) as running,
    ):
        yield ConsoleUnderTest(stack, config, running.url, running.clock, running.store)


@pytest.fixture
async def page_on(browser: Browser, planes_console: ConsoleUnderTest) -> AsyncIterator[Page]:
    async with browser_page(browser, planes_console.url) as opened:
        yield opened


async def sign_in(page: Page, username: str) -> None:
    await page.goto("/login")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()


async def test_an_sre_promotes_and_rolls_back_a_model(
    planes_console: ConsoleUnderTest, page_on: Page
) -> None:
    console, page = planes_console, page_on
    await asyncio.to_thread(write_datasets, console.stack.config, SEED, [MODEL])
    async with console.stack.channel("ai") as channel:
        registry = ai_pb2_grpc.ModelRegistryServiceStub(channel)
        trained = await registry.TrainModel(
            ai_pb2.TrainModelRequest(model=MODEL, seed=SEED), timeout=120
        )
        new = trained.version.version
        assert new == 2, trained
        await registry.PromoteModel(
            ai_pb2.PromoteModelRequest(
                model=MODEL, version=new, target_state=ai_pb2.MODEL_STATE_APPROVED
            ),
            timeout=60,
        )

    await sign_in(page, "sam")
    await page.goto(f"/models/{MODEL}/{new}")
    await expect(page.get_by_test_id("model-state")).to_have_text("approved")
    await page.get_by_label("Move to").select_option("live")
    await page.get_by_label("Reason (recorded as your approval)").fill("Better PR AUC on seed 8")
    await shot(page, "model-promote")
    await page.get_by_role("button", name="Promote").click()
    await expect(page.get_by_test_id("model-state")).to_have_text("live")
    # The registry recorded the approval: the operator signed in, and the reason.
    approvals = page.get_by_test_id("approvals").locator("tbody tr")
    await expect(approvals).to_have_count(2)  # approved (by the admin API), then live
    await expect(approvals.nth(0)).to_contain_text("(not named)")
    await expect(approvals.nth(1)).to_contain_text("live")
    await expect(approvals.nth(1)).to_contain_text("sam")
    await expect(approvals.nth(1)).to_contain_text("Better PR AUC on seed 8")
    await shot(page, "model-approvals")
    assert not await accessibility_problems(page, f"/models/{MODEL}/{new}")

    async with console.stack.channel("ai") as channel:
        scoring = ai_pb2_grpc.ScoringServiceStub(channel)
        for index in range(TEST_AI["drift"]["update_every_scores"]):
            await scoring.Score(
                ai_pb2.ScoreRequest(payment=payment(account_id=f"acct_{index % 20:06d}")),
                timeout=10,
            )
    await page.goto("/models")
    await expect(page.get_by_test_id(f"live-{MODEL}")).to_have_text(f"v{new}")
    assert await page.locator("svg.chart title").first.text_content() == (
        "Held-out ROC AUC by version"
    )
    # Drift: the live version's PSI series, charted once recomputed (scores below).
    drift = page.locator(f'section[data-drift="{MODEL}"]')
    await expect(drift.locator('tr[data-series="score"]')).to_have_count(1)
    await expect(drift.locator("svg.chart title")).to_have_text(
        f"{MODEL} v{new}: PSI against the training baseline"
    )
    assert await drift.locator('svg.chart g[data-series="score"] circle').count() >= 1
    await shot(page, "models")
    assert not await accessibility_problems(page, "/models")
    await page.get_by_label(f"Reason for rolling {MODEL} back to v1").fill("Alert rate doubled")
    await page.get_by_role("button", name=f"Roll {MODEL} back").click()
    await expect(page.get_by_test_id(f"live-{MODEL}")).to_have_text("v1")
    await expect(page.get_by_test_id(f"state-{MODEL}-{new}")).not_to_have_text("live")
    await shot(page, "models-rolled-back")
    await expect(page.get_by_test_id(f"approval-{MODEL}-1")).to_have_text(
        "rollback by sam: Alert rate doubled"
    )

    async with console.stack.channel("ai") as channel:
        live = await ai_pb2_grpc.ModelRegistryServiceStub(channel).GetModelVersion(
            ai_pb2.GetModelVersionRequest(model=MODEL), timeout=10
        )
        assert live.version.version == 1
        last = live.version.approvals[-1]
        assert (last.rollback, last.actor, last.reason) == (True, "sam", "Alert rate doubled")
        scored = await ai_pb2_grpc.ScoringServiceStub(channel).Score(
            ai_pb2.ScoreRequest(payment=payment()), timeout=10
        )
        assert scored.score_ref.version == "1", scored.score_ref

    entries = console.store.audit_entries(50, actor="sam")
    promoted = [e for e in entries if e.action == "model.promote"]
    assert len(promoted) == 1 and promoted[0].outcome == "ok"
    assert promoted[0].before["reason"] == "Better PR AUC on seed 8"
    assert promoted[0].before["state"] == "MODEL_STATE_APPROVED"
    assert promoted[0].after["state"] == "MODEL_STATE_LIVE"
    rolled = [e for e in entries if e.action == "model.rollback"]
    assert len(rolled) == 1 and rolled[0].outcome == "ok"
    assert rolled[0].before["reason"] == "Alert rate doubled"
    assert rolled[0].before["version"] == new and rolled[0].after["version"] == 1


async def _load_changed_bundle(console: ConsoleUnderTest) -> tuple[str, str]:
    """(live version, the stored version whose possible-match rule holds)."""
    text = shipped_default_path().read_text()
    assert text.count(POSSIBLE_MATCH) == 1
    changed = text.replace(POSSIBLE_MATCH, POSSIBLE_MATCH.replace("review", "hold"))
    async with console.stack.channel("policy") as channel:
        bundles = policy_pb2_grpc.BundleServiceStub(channel)
        live = (await bundles.GetActiveBundle(pb.GetActiveBundleRequest(), timeout=10)).live
        loaded = await bundles.LoadBundle(
            pb.LoadBundleRequest(
                content=changed, label="hold-possible-matches", target=pb.BUNDLE_TARGET_STORE
            ),
            timeout=10,
        )
    return live.version, loaded.bundle.version


async def _live_bundle(console: ConsoleUnderTest) -> str:
    async with console.stack.channel("policy") as channel:
        active = await policy_pb2_grpc.BundleServiceStub(channel).GetActiveBundle(
            pb.GetActiveBundleRequest(), timeout=10
        )
    return str(active.live.version)


async def test_a_risk_admin_reads_the_diff_and_activates_a_bundle(
    planes_console: ConsoleUnderTest, page_on: Page
) -> None:
    console, page = planes_console, page_on
    live, changed = await _load_changed_bundle(console)
    await sign_in(page, "rosa")
    await page.goto("/bundles")
    await expect(page.get_by_test_id("live-bundle")).to_have_text(live)
    await page.get_by_label("From").select_option(live)
    await page.get_by_label("To").select_option(changed)
    await page.get_by_role("button", name="Compare").click()
    diff = page.get_by_test_id("bundle-diff")
    await expect(diff).to_contain_text("- id: sanctions_possible_match")
    removed = await page.locator(".diff-removed").all_inner_texts()
    added = await page.locator(".diff-added").all_inner_texts()
    assert removed == ["-    outcome: review"] and added == ["+    outcome: hold"]
    await shot(page, "bundle-diff")
    assert not await accessibility_problems(page, page.url)

    await page.goto("/bundles")
    row = page.locator(f'tr[data-bundle="{changed}"]')
    assert not await accessibility_problems(page, "/bundles")
    await row.get_by_label("Reason").fill("Possible matches wait for a human before paying")
    await row.get_by_role("button", name="Activate").click()
    await expect(page.get_by_test_id("live-bundle")).to_have_text(changed)
    await expect(page.get_by_test_id(f"approvals-{changed}")).to_contain_text(
        "live set by rosa: Possible matches wait for a human before paying"
    )
    await shot(page, "bundle-activated")
    assert await _live_bundle(console) == changed
    async with console.stack.channel("policy") as channel:
        listed = await policy_pb2_grpc.BundleServiceStub(channel).ListBundles(
            pb.ListBundlesRequest(), timeout=10
        )
    [stored] = [b for b in listed.bundles if b.version == changed]
    assert [(a.slot, a.set, a.actor, a.reason) for a in stored.approvals] == [
        ("live", True, "rosa", "Possible matches wait for a human before paying")
    ]

    entries = console.store.audit_entries(50, actor="rosa", action="bundle.activate")
    assert len(entries) == 1 and entries[0].outcome == "ok"
    assert entries[0].before == {
        "live": live,
        "shadow": "",
        "reason": "Possible matches wait for a human before paying",
    }
    assert entries[0].after == {"live": changed, "shadow": ""}

    # Back to the shipped bundle, through the page as well.
    await page.locator(f'tr[data-bundle="{live}"]').get_by_label("Reason").fill("Revert")
    await page.locator(f'tr[data-bundle="{live}"]').get_by_role("button", name="Activate").click()
    await expect(page.get_by_test_id("live-bundle")).to_have_text(live)
    assert await _live_bundle(console) == live


async def test_a_reviewer_cannot_activate_a_bundle(
    planes_console: ConsoleUnderTest, page_on: Page
) -> None:
    console, page = planes_console, page_on
    live, changed = await _load_changed_bundle(console)
    await sign_in(page, "rita")
    await page.goto("/bundles")
    await expect(page.get_by_test_id("live-bundle")).to_have_text(live)
    assert await page.get_by_role("button", name="Activate").count() == 0
    await shot(page, "bundles-reviewer")
    headers = await page.locator("body").get_attribute("hx-headers")
    assert headers
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', headers)
    assert found
    # A forged activation with a valid session and CSRF token: the role is refused.
    answer = await page.request.post(
        "/bundles/activate",
        form={"csrf_token": found.group(1), "version": changed, "reason": "sneaky"},
        max_redirects=0,
    )
    assert answer.status == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    assert await _live_bundle(console) == live
    refused = console.store.audit_entries(50, actor="rita", action="permission.refused")
    assert [e.target for e in refused] == ["/bundles/activate"]
    assert not console.store.audit_entries(50, actor="rita", action="bundle.activate")
