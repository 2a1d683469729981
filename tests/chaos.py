"""Tools of the chaos test (tests/test_chaos.py): mirrors in their own processes, node jobs and
runners found and killed at moments chosen by a seeded random generator.

Moments are counted in node job starts (a new scratch directory `train_*` under the runner's
sandbox) plus a fraction of a measured job time (tests/timing.py), never in fixed seconds, so a
slow machine shifts the kills with the work instead of past it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.timing import job_seconds

REPO = Path(__file__).resolve().parents[1]
KILLED_IN_LOG = "Abnormal termination (signal 9)"


class ExternalMirror:
    """`dagtrain serve DATASET --mirrors 1 --ports PORT` in its own process."""

    def __init__(self, dataset: Path, port: int) -> None:
        self.url = f"ftp://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", str(dataset), "--mirrors", "1",
             "--ports", str(port)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20 * job_seconds()
        while not _listening(port):
            assert self.proc.poll() is None, f"dagtrain serve on port {port} exited"
            assert time.monotonic() < deadline, f"dagtrain serve on port {port}: not listening"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def job_group(sandbox: Path) -> int | None:
    """The process group of the job running in `sandbox` (its cwd), if one runs there now."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == sandbox:
                    return os.getpgid(int(entry.name))
    return None


def landed_job_kills(run_dir: Path) -> int:
    """Node jobs that died of SIGKILL while their runner lived (it wrote their job logs)."""
    logs = [*run_dir.glob("rounds/*/*/job.log"), *run_dir.glob("lanes/*/*/job.log")]
    return sum(log.read_text().count(KILLED_IN_LOG) for log in logs)


@dataclass
class Kill:
    """Kill `what` ("job", "runner" or "mirror") `delay_s` after the `start`-th job start."""

    what: str
    start: int
    delay_s: float
    due: float | None = None
    sandbox: Path | None = None
    landed: bool = False


def plan_kills(rng: random.Random, what: list[str], starts: range) -> list[Kill]:
    """One kill per entry of `what`, at distinct job starts in order, each 0.2 to 0.8 of a
    measured job time after its start: the jobs are killed before the runner."""
    picked = sorted(rng.sample(starts, len(what)))
    return [
        Kill(kind, start, rng.uniform(0.2, 0.8) * job_seconds())
        for kind, start in zip(what, picked, strict=True)
    ]


@dataclass
class ChaosRun:
    """One `dagtrain run` of a run directory, restarted after each kill of its runner."""

    run_dir: Path
    options: list[str]
    kills: list[Kill]
    starts: list[Path] = field(default_factory=list)
    runner: subprocess.Popen[bytes] | None = None
    runner_kills: int = 0

    def start(self) -> None:
        self.runner = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(self.run_dir), *self.options],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.runner is not None and self.runner.poll() is None:
            self.runner.kill()
            self.runner.wait()

    @property
    def finished(self) -> bool:
        return self.runner is not None and self.runner.poll() is not None

    def new_starts(self) -> list[Path]:
        """Node job sandboxes seen for the first time, oldest cluster first."""
        sandbox = self.run_dir / ".local_runner/sandbox"
        seen = set(self.starts)
        fresh = [p for p in sandbox.glob("train_*") if p not in seen] if sandbox.is_dir() else []
        fresh.sort(key=lambda p: int(p.name.rsplit(".", 1)[1]))
        self.starts += fresh
        return fresh

    def poll(self, now: float) -> None:
        """Arm the kills whose job start came, fire those that are due."""
        first = len(self.starts) + 1
        for number, path in enumerate(self.new_starts(), start=first):
            for kill in self.kills:
                if kill.start == number:
                    kill.due, kill.sandbox = now + kill.delay_s, path
        for kill in self.kills:
            if kill.due is not None and not kill.landed and now >= kill.due:
                self._fire(kill)

    def _fire(self, kill: Kill) -> None:
        assert self.runner is not None and kill.sandbox is not None
        if kill.what == "runner":
            if self.runner.poll() is None:
                self.stop()
                self.runner_kills += 1
                kill.landed = True
                self.start()  # resumes from the journal
            else:
                kill.due = None  # the run had ended: nothing left to kill
            return
        group = job_group(kill.sandbox)
        if group is not None:
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            kill.landed = True
        elif not kill.sandbox.exists():
            kill.due = None  # the job ended before its moment came; else it is still starting


def drive(
    runs: list[ChaosRun], timeout_s: float, mirror_kill: tuple[Kill, ExternalMirror] | None = None
) -> None:
    """Run until every runner has exited, firing the runs' kills and the mirror kill, whose
    job starts are counted over all runs (the mirrors serve them all)."""
    for run in runs:
        run.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not all(run.finished for run in runs):
            now = time.monotonic()
            assert now < deadline, f"the runs did not end within {timeout_s:.0f} s"
            for run in runs:
                run.poll(now)
            if mirror_kill is not None:
                _mirror_poll(*mirror_kill, sum(len(run.starts) for run in runs), now)
            time.sleep(0.05)
    finally:
        for run in runs:
            run.stop()


def _mirror_poll(kill: Kill, mirror: ExternalMirror, starts: int, now: float) -> None:
    if kill.due is None and starts >= kill.start:
        kill.due = now + kill.delay_s
    if kill.due is not None and not kill.landed and now >= kill.due:
        mirror.kill()
        kill.landed = True
