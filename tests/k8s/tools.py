"""External tools the k8s suites need (kubectl, promtool): missing, a test
fails under CI=true (.ci/run installs promtool; kubectl is on the CI machine)
and is skipped loudly elsewhere, as tests/conftest.py does for servers."""

from __future__ import annotations

import shutil

from tests.conftest import _loud_skip


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _loud_skip(f"{name} tests", f"{name} is not installed ({package})")
    assert path is not None
    return path
