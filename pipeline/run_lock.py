"""One dagtrain process at a time per run directory: `run` and `submit` hold RUN_DIR/runner.lock.

Two runners on one run would both execute every job and overwrite each other's updates. The
lock is an advisory `flock` on the file, so the kernel drops it when its holder dies, however it
dies. The file also records who holds it (one JSON line: pid, host, started, command and the
process's identity), for the refusal message and for `dagtrain status`; a clean release empties
it, so a record left behind means its holder died without releasing. The record guards against
the two cases flock alone gets wrong: a file system that ignores flock (the recorded process is
still alive: refuse) and a recorded PID now used by another process (its identity differs: the
lock is free).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from node_payload.common.errors import UserError

LOCK_FILE = "runner.lock"


def process_identity(pid: int) -> str | None:
    """Boot id and start time of a live process (None: no such process), so a reused PID is
    told apart from the process that recorded it. Without /proc, the PID alone."""
    proc = Path("/proc")
    if not (proc / "self/stat").is_file():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    start = stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime, after "pid (comm)"
    boot = (proc / "sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}:{start}"


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run's lock."""

    pid: int
    host: str
    started: str
    command: str
    identity: str | None

    def running(self) -> bool | None:
        """Whether the holder still runs; None for another host's process, which cannot be told."""
        if self.host != socket.gethostname():
            return None
        return self.identity is not None and process_identity(self.pid) == self.identity

    def describe(self) -> str:
        return f"`dagtrain {self.command}` (PID {self.pid} on {self.host}, started {self.started})"


def _parse(text: str) -> Holder | None:
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return None


def lock_path(run_dir: Path) -> Path:
    return run_dir / LOCK_FILE


def recorded_holder(run_dir: Path) -> Holder | None:
    """The holder the lock file names, unless its process is known to have ended; reads, never
    locks (a lock taken here, however briefly, would refuse a runner starting meanwhile)."""
    try:
        holder = _parse(lock_path(run_dir).read_text())
    except OSError:
        return None
    return holder if holder is not None and holder.running() is not False else None


class RunLock:
    """`with RunLock(run_dir, "run"):` refuses with one message while another process holds it.

    `stale` is the record of a holder that died without releasing the lock, taken over here.
    """

    def __init__(self, run_dir: Path, command: str) -> None:
        self.run_dir = run_dir
        self.command = command
        self.stale: Holder | None = None
        self._fd: int | None = None

    def _busy(self, holder: Holder | None) -> UserError:
        who = holder.describe() if holder is not None else "another dagtrain process"
        stop = f"stop it with `kill {holder.pid}` or " if holder is not None else ""
        return UserError(
            f"{self.run_dir}: already in use by {who}; {stop}wait for it to end, then try again "
            f"(lock: {lock_path(self.run_dir)})"
        )

    def __enter__(self) -> RunLock:
        path = lock_path(self.run_dir)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{path}: cannot open the run's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(_parse(path.read_text())) from None
        previous = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None and previous.running():  # alive, yet the flock was free
            os.close(fd)
            raise self._busy(previous)
        self.stale = previous
        me = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now().astimezone().isoformat(timespec="seconds"),
            command=self.command,
            identity=process_identity(os.getpid()),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # released cleanly: no record left behind
        os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd = None
