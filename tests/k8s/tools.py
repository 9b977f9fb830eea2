"""External tools the k8s suites need (kubectl, promtool): missing, a test
fails under CI=true (.ci/run installs promtool; kubectl is on the CI machine)
and is skipped loudly elsewhere, as tests/conftest.py does for servers."""

from __future__ import annotations

import shutil
import sys
import warnings

import pytest

from tests.conftest import in_ci


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    if in_ci():
        pytest.fail(
            f"{name} is not installed ({package}), and under CI=true that fails the suite",
            pytrace=False,
        )
    message = f"\n\n*** SKIPPING: {name} is not installed ({package}) ***\n"
    sys.stderr.write(message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)
