"""`python -m triplane_sim.sandbox_bank`: serves the sandbox bank on
sandbox_bank.listen (config: $TRIPLANE_CONFIG, environment overrides)."""

from __future__ import annotations

from aiohttp import web

from triplane.runtime.config import load_config
from triplane.runtime.lifetime import exit_with_supervisor
from triplane.runtime.net import host_port
from triplane_sim.sandbox_bank.server import build_app, clock_for


def main() -> None:
    exit_with_supervisor()
    config = load_config().sandbox_bank
    host, port = host_port(config.listen)
    app = build_app(config, clock_for(config))
    web.run_app(app, host=host, port=port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
