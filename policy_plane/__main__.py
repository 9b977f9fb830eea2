"""`python -m policy_plane`: serves the policy plane until SIGTERM."""

from __future__ import annotations

from policy_plane.app import build_plane
from triplane.runtime.config import load_config
from triplane.runtime.server import run
from triplane.runtime.telemetry import setup_logging


async def _serve() -> None:
    config = load_config()
    setup_logging("policy_plane", config.runtime.log_level, config.runtime.log_format)
    plane = build_plane(config)
    await plane.start()
    # Freezes the settled heap (bundle compiled, state loaded) out of the
    # collector's generations and sets runtime.gc_gen0_threshold.
    await plane.server.serve_until_signalled(config.runtime.gc_gen0_threshold)


def main() -> None:
    run(_serve, load_config().runtime.event_loop)


if __name__ == "__main__":
    main()
