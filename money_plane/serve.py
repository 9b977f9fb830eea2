"""Serving the money plane: serve the ledger until SIGTERM.

With money.server_processes > 1 (PostgreSQL only), this process is the
primary: it serves, runs the outbox relay and the sweepers, and supervises
workers that serve the same port through SO_REUSEPORT. SIGTERM to the
primary drains the workers too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence

from money_plane.app import MoneyPlane
from money_plane.metrics_share import MULTIPROCESS_DIR_ENV
from triplane.runtime.config import load_config
from triplane.runtime.server import run
from triplane.runtime.telemetry import setup_logging

log = logging.getLogger("triplane.money")


async def _serve(primary: bool) -> None:
    config = load_config()
    name = "money_plane" if primary else f"money_plane.worker.{os.getpid()}"
    setup_logging(name, config.runtime.log_level, config.runtime.log_format)
    plane = MoneyPlane(config)
    await plane.start(sweepers=primary, relay=primary, metrics=primary)
    assert plane.server is not None
    await plane.server.serve_until_signalled(config.runtime.gc_gen0_threshold)


def run_worker() -> None:
    run(lambda: _serve(primary=False), load_config().runtime.event_loop)


def main() -> None:
    config = load_config()
    extra = config.money.server_processes - 1
    if extra > 0 and config.money.store.backend != "postgres":
        logging.getLogger().warning("money.server_processes > 1 needs PostgreSQL; serving alone")
        extra = 0
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_worker, name=f"money-worker-{i}") for i in range(extra)]
    for worker in workers:
        worker.start()
    try:
        run(lambda: _serve(primary=True), config.runtime.event_loop)
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.join(timeout=config.runtime.shutdown_grace_s + 5)
            if worker.is_alive():
                worker.kill()
        _forget_workers_metrics(workers)


def _forget_workers_metrics(workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """With metrics shared between processes (money_plane/metrics_share.py):
    a gone worker's live gauges stop counting; its counters stay summed."""
    if not os.environ.get(MULTIPROCESS_DIR_ENV):
        return
    from prometheus_client import multiprocess

    for worker in workers:
        if worker.pid is not None:
            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
