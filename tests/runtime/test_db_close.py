"""Closing the runtime's Database while another thread reads.

A plane's background pass (the decision-search backfill) read on a reader
connection while the plane stopped and closed its store: close() closed that
connection under the running statement, and SQLite took the whole process
down (a segfault in a full test run). Now close() closes idle readers, a
reader in use is closed by its thread when released, and a thread waiting
for a reader is told the store closed instead of waiting forever."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from triplane.runtime.db import Database, DatabaseClosed

pytestmark = pytest.mark.timeout(60)

COUNT = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
    "SELECT count(*) FROM c"
)


def test_a_reader_in_use_finishes_its_read_after_close(tmp_path: Path) -> None:
    db = Database("sqlite", str(tmp_path / "store.db"), readers=2)
    checked_out, closed = threading.Event(), threading.Event()
    result: list[object] = []

    def read() -> None:
        try:
            with db.read() as tx:
                checked_out.set()
                assert closed.wait(10)
                result.append(tx.one(COUNT))
        except Exception as error:  # the assertion below names it
            result.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    assert checked_out.wait(10)
    db.close()
    closed.set()
    reader.join(10)
    assert result == [(20000,)]
    with pytest.raises(DatabaseClosed), db.read():
        pass


def test_a_thread_waiting_for_a_reader_is_told_the_store_closed(tmp_path: Path) -> None:
    db = Database("sqlite", str(tmp_path / "store.db"), readers=1)
    checked_out, release = threading.Event(), threading.Event()
    outcomes: list[str] = []

    def hold() -> None:
        with db.read():
            checked_out.set()
            assert release.wait(10)

    def wait_for_reader() -> None:
        try:
            with db.read():
                outcomes.append("read")
        except DatabaseClosed:
            outcomes.append("closed")

    holder = threading.Thread(target=hold)
    holder.start()
    assert checked_out.wait(10)
    waiter = threading.Thread(target=wait_for_reader)
    waiter.start()
    db.close()
    waiter.join(10)
    release.set()
    holder.join(10)
    assert outcomes == ["closed"]
