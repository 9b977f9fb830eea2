"""tritonserver and its Python-backend stubs die with the process that started
them, even when that process is killed outright (SIGKILL): a stub orphaned by
a killed tritonserver otherwise keeps running (and holding its shared memory)
for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ai_helpers import ai_config, require_triton

HELPERS = Path(__file__).parent


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (by the parent pids in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_starter_leaves_no_triton_nor_stub(tmp_path: Path) -> None:
    require_triton()
    ai_config(tmp_path / "state")  # the dev certificates the config needs
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(HELPERS)!r})
        from pathlib import Path
        from ai_helpers import ai_config, start_triton
        root = Path({str(tmp_path)!r})
        process = start_triton(root, ai_config(root / "state"))
        print(process.pid, flush=True)
        time.sleep(600)
        """
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env={**os.environ}
    )
    try:
        assert starter.stdout is not None
        triton_pid = int(starter.stdout.readline())
        deadline = time.monotonic() + 60
        while len(_descendants(triton_pid)) < 2:  # one stub per model
            assert time.monotonic() < deadline, "tritonserver started no stubs"
            time.sleep(0.2)
        stubs = _descendants(triton_pid)
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in {triton_pid, *stubs}):
            assert time.monotonic() < deadline, (
                f"still running: {[p for p in {triton_pid, *stubs} if _alive(p)]}"
            )
            time.sleep(0.2)
    finally:
        if starter.poll() is None:
            starter.kill()
