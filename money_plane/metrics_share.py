"""Metrics across the money plane's serving processes.

With money.server_processes > 1 the primary and its workers serve one port
(SO_REUSEPORT) and the kernel spreads connections over them, so each
process answers a share of the calls. Prometheus's client keeps its values in
process memory unless PROMETHEUS_MULTIPROC_DIR names a directory when it is
first imported: then every process writes its values to files there and the
primary's endpoint (triplane.runtime.metrics.serve_metrics) adds them up.

So `python -m money_plane` calls `share_between_processes()` before anything
imports prometheus_client; it imports only the config loader. Workers are
spawned with the primary's environment and inherit the directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from triplane.runtime.config import load_config

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes() -> Path | None:
    """Points prometheus_client at a fresh directory under the state dir when
    this process will run workers; the directory, or None (one process, or
    the variable set already, by the caller or for a worker)."""
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        return None
    config = load_config()
    money = config.money
    if money.server_processes <= 1 or money.store.backend != "postgres":
        return None
    directory = config.state_path / "metrics" / f"money-{os.getpid()}"
    # A directory left by an earlier process of the same pid holds its
    # counts, which would be added to ours.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROCESS_DIR_ENV] = str(directory)
    return directory
