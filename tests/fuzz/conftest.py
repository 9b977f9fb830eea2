"""Prints the fuzz run's figures at the end of a session that ran it."""

from __future__ import annotations

import pytest

from tests.fuzz.harness import TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY.planes:
        return
    terminalreporter.section("fuzz")
    terminalreporter.write_line(TALLY.summary())
