"""`python -m ai_plane`: serve the AI plane until SIGTERM (starting our own
tritonserver unless ai.triton_url is set, and stopping it on exit)."""

from __future__ import annotations

from ai_plane.app import AiPlane
from triplane.runtime.config import load_config
from triplane.runtime.server import run
from triplane.runtime.telemetry import setup_logging


async def _serve() -> None:
    config = load_config()
    setup_logging("ai_plane", config.runtime.log_level, config.runtime.log_format)
    plane = AiPlane(config)
    try:
        await plane.start()
        assert plane.server is not None
        # Everything built at start (models, caches) lives for good: the
        # runtime's GC tuning (collect, freeze, runtime.gc_gen0_threshold)
        # keeps it out of the collector's generations, as every plane does.
        await plane.server.serve_until_signalled(config.runtime.gc_gen0_threshold)
    finally:
        # Whatever happened, never leave a tritonserver behind.
        await plane.stop()


def main() -> None:
    run(_serve, load_config().runtime.event_loop)


if __name__ == "__main__":
    main()
