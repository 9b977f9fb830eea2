"""`python -m gateway`: serve the public API until SIGTERM."""

from __future__ import annotations

from gateway.app import Gateway
from triplane.runtime.config import load_config
from triplane.runtime.server import run
from triplane.runtime.telemetry import setup_logging


async def _serve() -> None:
    config = load_config()
    setup_logging("gateway", config.runtime.log_level, config.runtime.log_format)
    gateway = Gateway(config)
    await gateway.start()
    assert gateway.server is not None
    await gateway.server.serve_until_signalled(config.runtime.gc_gen0_threshold)


def main() -> None:
    run(_serve, load_config().runtime.event_loop)


if __name__ == "__main__":
    main()
