"""`python -m policy_plane`: serves the policy plane until SIGTERM."""

from __future__ import annotations

import asyncio

from policy_plane.app import build_plane, settle_heap
from triplane.runtime.config import load_config
from triplane.runtime.telemetry import setup_logging


async def _serve() -> None:
    config = load_config()
    setup_logging("policy_plane", config.runtime.log_level, config.runtime.log_format)
    plane = build_plane(config)
    await plane.start()
    settle_heap(config)
    await plane.server.serve_until_signalled()


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
