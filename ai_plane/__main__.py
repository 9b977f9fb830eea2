"""`python -m ai_plane`: serve the AI plane until SIGTERM (starting our own
tritonserver unless ai.triton_url is set, and stopping it on exit)."""

from __future__ import annotations

import asyncio
import gc

from ai_plane.app import AiPlane
from triplane.runtime.config import load_config
from triplane.runtime.telemetry import setup_logging


async def _serve() -> None:
    config = load_config()
    setup_logging("ai_plane", config.runtime.log_level, config.runtime.log_format)
    plane = AiPlane(config)
    try:
        await plane.start()
        # Everything built at start (models, caches) lives for good: keep it
        # out of the collector's generations, so its pauses stay short.
        gc.freeze()
        assert plane.server is not None
        await plane.server.serve_until_signalled()
    finally:
        # Whatever happened, never leave a tritonserver behind.
        await plane.stop()


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
