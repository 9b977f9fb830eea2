"""The suite's own guards, checked by running a small session of pytest in a
child process:
- a session that leaves a process running fails, naming the process and the
  test that started it, and the process is killed;
- a suite whose server cannot be reached skips loudly, except under CI=true,
  where it fails (CI starts PostgreSQL and Redis)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SESSION_MARKER_ENV
from triplane.runtime.net import free_port

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the guard reads /proc"
)

ROOT = Path(__file__).resolve().parents[2]

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
PYTEST += ["-o", "asyncio_default_fixture_loop_scope=function"]
CONFTEST = (
    "from tests.conftest import pg_admin_dsn, pg_dsn, pytest_configure, pytest_sessionfinish"
    "  # noqa: F401\n"
)

LEAKY = """
import subprocess
from pathlib import Path


def test_forgets_its_child():
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    Path({pid_file!r}).write_text(str(child.pid))


def test_cleans_up_after_itself():
    child = subprocess.Popen(["sleep", "600"])
    child.kill()
    child.wait()
"""

TIDY = """
import subprocess


def test_cleans_up_after_itself():
    child = subprocess.Popen(["sleep", "600"])
    child.terminate()
    child.wait()
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


NEEDS_POSTGRES = """
def test_uses_the_database(pg_dsn):
    assert pg_dsn
"""


def run_session(
    directory: Path, tests: str, **environ: str | None
) -> subprocess.CompletedProcess[str]:
    """pytest on one test file in `directory`, with the suite's conftest
    hooks; `environ` adds variables to this environment (None removes one)."""
    directory.mkdir()
    (directory / "conftest.py").write_text(CONFTEST)
    (directory / "test_session.py").write_text(textwrap.dedent(tests))
    child_environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(directory)])}
    for name, value in environ.items():
        if value is None:
            child_environ.pop(name, None)
        else:
            child_environ[name] = value
    return subprocess.run(
        [*PYTEST, "-rs", "--rootdir", str(directory), str(directory)],
        capture_output=True,
        text=True,
        env=child_environ,
        cwd=directory,
        timeout=240,
    )


def test_a_session_that_leaves_a_process_fails_and_the_process_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "left.pid"
    done = run_session(tmp_path / "leaky", LEAKY.format(pid_file=str(pid_file)))
    left_pid = int(pid_file.read_text())
    try:
        output = done.stdout + done.stderr
        assert done.returncode == pytest.ExitCode.TESTS_FAILED, output
        assert "2 passed" in output  # every test passed: the failure is the leak
        assert "left 1 process(es) running" in output
        assert f"pid {left_pid}: sleep 600" in output
        assert "test_session.py::test_forgets_its_child (call)" in output
        assert not alive(left_pid)
    finally:
        if alive(left_pid):
            os.kill(left_pid, signal.SIGKILL)


def test_a_tidy_session_passes(tmp_path: Path) -> None:
    done = run_session(tmp_path / "tidy", TIDY)
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.OK, output
    assert "process(es) running" not in output


def test_this_session_marks_what_it_starts() -> None:
    """Every process the suite starts inherits the marker the guard looks for."""
    marker = os.environ[SESSION_MARKER_ENV]
    child = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ[{SESSION_MARKER_ENV!r}])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == marker


def test_an_unreachable_server_fails_the_suite_under_ci(tmp_path: Path) -> None:
    nobody = str(free_port())  # nothing listens there
    done = run_session(tmp_path / "ci", NEEDS_POSTGRES, CI="true", TRIPLANE_TEST_PG_PORT=nobody)
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert "1 error" in output and "SKIPPING" not in output and "1 skipped" not in output
    assert f"PostgreSQL suite (no server at 127.0.0.1:{nobody})" in output
    assert "under CI=true that fails the suite" in output


def test_an_unreachable_server_skips_loudly_outside_ci(tmp_path: Path) -> None:
    nobody = str(free_port())
    done = run_session(tmp_path / "dev", NEEDS_POSTGRES, CI=None, TRIPLANE_TEST_PG_PORT=nobody)
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.OK, output
    assert "1 skipped" in output
    assert f"*** SKIPPING PostgreSQL suite (no server at 127.0.0.1:{nobody})" in output
