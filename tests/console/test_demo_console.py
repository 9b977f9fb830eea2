"""`make demo`'s console check against a running policy plane: a reviewer
account made as the demo makes it signs in over HTTP and every page a
reviewer may read (Cases, Decisions, Bundles) answers 200 for the tenant."""

from __future__ import annotations

from pathlib import Path

from triplane_tools import demo_console

from .conftest import TENANT, ConsoleUnderTest


async def test_a_demo_reviewer_reads_every_page_of_the_role(
    console: ConsoleUnderTest, tmp_path: Path
) -> None:
    accounts = await demo_console.create_accounts(
        console.store, tmp_path / demo_console.ACCOUNTS_FILE, console.clock.now_us(), ["reviewer"]
    )
    report = await demo_console.check_pages(console.url, accounts, TENANT)
    assert [(c.role, c.path, c.status) for c in report.checks] == [
        ("reviewer", "/cases", 200),
        ("reviewer", "/decisions", 200),
        ("reviewer", "/bundles", 200),
    ]
    assert report.failures() == []
    assert report.summary().startswith("console           3/3 pages answered 200 (reviewer 3/3)")
