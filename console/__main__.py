"""`python -m console`: serves the operator console on console.listen
(config: $TRIPLANE_CONFIG, environment overrides) until SIGTERM."""

from __future__ import annotations

import uvicorn

from console.app import create_app
from triplane.runtime.config import load_config
from triplane.runtime.lifetime import exit_with_supervisor
from triplane.runtime.metrics import serve_metrics
from triplane.runtime.net import host_port
from triplane.runtime.telemetry import setup_logging


def main() -> None:
    exit_with_supervisor()
    config = load_config()
    setup_logging("console", config.runtime.log_level, config.runtime.log_format)
    host, port = host_port(config.console.listen)
    metrics = serve_metrics(config.console.metrics_listen, "console.metrics_listen")
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
    )
    if metrics is not None:
        metrics.close()


if __name__ == "__main__":
    main()
