"""Background tasks: the one way every plane runs a periodic sweep and stops its tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("triplane.tasks")


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[object] | asyncio.Task[None] | None],
) -> None:
    """Cancels every task, then waits for all of them to finish. A task that
    had already failed is logged, not raised: stopping must go on."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    results = await asyncio.gather(*pending, return_exceptions=True)
    for task, result in zip(pending, results, strict=True):
        if isinstance(result, Exception):
            log.warning("background task %s had failed: %r", task.get_name(), result)


async def every(
    interval_s: float,
    work: Callable[[], Awaitable[object]],
    what: str,
    *,
    first_at_start: bool = False,
) -> None:
    """Runs `work` every interval_s until cancelled (after the first wait, or
    at once with first_at_start). A run that fails is logged and the next one
    comes at its time: a background sweep never dies of one bad pass."""
    if first_at_start:
        await _run_logged(work, what)
    while True:
        await asyncio.sleep(interval_s)
        await _run_logged(work, what)


async def _run_logged(work: Callable[[], Awaitable[object]], what: str) -> None:
    try:
        await work()
    except Exception:
        log.exception("%s failed; tried again next interval", what)
