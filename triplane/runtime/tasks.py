"""Stopping background tasks: the one way every plane does it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

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
