"""Child processes that die with their parent.

A supervisor (the dev stack, a plane that starts tritonserver, the money plane
primary that starts its workers) runs each child in a session of its own, so a
Ctrl-C in the terminal reaches only the supervisor, which then stops its
children in order. That leaves one hole: a supervisor killed with SIGKILL (or
one that crashes) stops nothing, and its children keep running with their ports
held. On Linux the kernel closes the hole: a child that asked for a parent-death
signal (prctl PR_SET_PDEATHSIG) is sent it when its parent goes.

The signal is tied to the parent THREAD that forked the child, not to the
parent process: a child started from a worker thread is killed when that
thread exits. So a supervisor starts its children from a thread that lives as
long as they do (the main thread, or the event loop's thread) and only waits
for them in worker threads.

Elsewhere (macOS) there is no such call and these helpers do nothing: a
supervisor killed with SIGKILL there leaves its children running.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Mapping

log = logging.getLogger("triplane.lifetime")

# Set by the dev stack in every plane's environment (the supervisor's pid): a
# serving process that sees it asks for the parent-death signal itself, so the
# processes a plane starts with multiprocessing die with the plane as well.
SUPERVISOR_PID_ENV = "TRIPLANE_SUPERVISOR_PID"

_PR_SET_PDEATHSIG = 1
# The status a child exits with when its parent was already gone before the
# parent-death signal was armed (the window between fork and prctl).
ORPHANED_EXIT_CODE = 70


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Loaded once in the parent: a child between fork and exec should do as little
# as it can (no library loading).
_PRCTL = _load_prctl()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Asks the kernel to send `sig` to this process when the thread that
    started it exits. False where the platform has no such call."""
    if _PRCTL is None:
        return False
    if _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    return True


def die_with_parent() -> Callable[[], None]:
    """A `subprocess.Popen(preexec_fn=...)` that makes the child get SIGKILL
    when the calling thread exits. Built in the parent (it notes the parent's
    pid); the child, before exec, arms the signal and then checks that its
    parent is still the one that forked it: a parent that died in between
    would never send the signal, so the child leaves at once instead."""
    parent_pid = os.getpid()

    def preexec() -> None:
        if set_parent_death_signal() and os.getppid() != parent_pid:
            os._exit(ORPHANED_EXIT_CODE)

    return preexec


def exit_with_supervisor(environ: Mapping[str, str] = os.environ) -> bool:
    """For a serving process (runtime.server.run calls it): when a supervisor
    started it ($TRIPLANE_SUPERVISOR_PID), die with the process that started
    it: the supervisor, or the plane's own process for a multiprocessing
    worker. Exits at once when that parent is already gone. Returns whether
    the signal was armed."""
    supervisor = environ.get(SUPERVISOR_PID_ENV, "")
    if not supervisor.isdigit():
        return False
    parent = multiprocessing.parent_process()
    expected_pid = parent.pid if parent is not None and parent.pid else int(supervisor)
    if not set_parent_death_signal():
        return False
    if os.getppid() != expected_pid:
        log.error(
            "parent process %d is gone before this one started serving: exiting", expected_pid
        )
        os._exit(ORPHANED_EXIT_CODE)
    return True
