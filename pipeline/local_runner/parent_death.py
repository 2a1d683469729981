"""Jobs and scripts die with the runner: a runner killed with SIGKILL cannot stop them itself.

Each child runs in its own process group (the runner's Ctrl-C is not theirs, and stopping a job
stops what it started) and, on Linux, asks the kernel for SIGKILL when the thread that started it
ends (prctl PR_SET_PDEATHSIG): that thread lives until the child has exited, so it ends early
only when the runner process dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from functools import partial

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with(runner_pid: int) -> None:
    """Runs in the child between fork and exec: only async-signal-safe calls, resolved before."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # type: ignore[misc]
    if os.getppid() != runner_pid:  # the runner died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_runner() -> Callable[[], None] | None:
    """A preexec_fn for subprocess.Popen (None where the kernel offers no such request)."""
    return partial(_die_with, os.getpid()) if _prctl is not None else None
