"""`python -m money_plane`: serve the ledger until SIGTERM."""

from __future__ import annotations

import asyncio

from money_plane.app import MoneyPlane
from triplane.runtime.config import load_config
from triplane.runtime.telemetry import setup_logging


async def _serve() -> None:
    config = load_config()
    setup_logging("money_plane", config.runtime.log_level, config.runtime.log_format)
    plane = MoneyPlane(config)
    await plane.start()
    assert plane.server is not None
    await plane.server.serve_until_signalled()


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
