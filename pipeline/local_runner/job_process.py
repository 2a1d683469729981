"""Run one node job the way a schedd + starter would: sandbox, job ad, policy, user log.

The job ad is kept live (JobStatus, EnteredCurrentStatus, HoldReasonCode, ...) and
periodic_remove is evaluated against it with classad2 about once a second, so deadline
expressions written for the pool behave the same here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import classad2

from .event_log import UserLog
from .parent_death import die_with_runner
from .sandbox import command_path, should_transfer_output, stage_in, stage_out
from .slots import Evictions
from .spool import restore_checkpoint, save_checkpoint
from .submit_description import JobSpec
from .warm_pool import WarmPool

# DAGMan reports a job removed from the queue by anything other than DAGMan itself (here:
# periodic_remove) with $RETURN -1002 (HTCondor manual, DAGMan "Scripts", $RETURN macro).
REMOVED_RETURN = -1002
IDLE, RUNNING, HELD = 1, 2, 5
HOLD_TRANSFER_OUTPUT, HOLD_TRANSFER_INPUT, HOLD_DURATION = 12, 13, 46
POLICY_INTERVAL = 1.0
KILL_GRACE = 2.0
_UNIVERSE = {"vanilla": 5, "local": 12}
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
# What a starter sets to request_cpus for a vanilla job (STARTER_NUM_THREADS_ENV_VARS, as
# HTCondor 23.9 sets them); a local-universe job gets none of them.
THREAD_VARIABLES = (
    "CUBACORES", "GOMAXPROCS", "JULIA_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "OPENBLAS_NUM_THREADS", "PYTHON_CPU_COUNT",
    "ROOT_MAX_THREADS", "TF_LOOP_PARALLEL_ITERATIONS", "TF_NUM_THREADS",
)  # fmt: skip


class RunningJob(Protocol):
    """A started job: a fresh process (FreshJob) or a warm server's child (warm_pool)."""

    returncode: int | None
    note: str  # a line for the job's stderr when it ended without an exit status of its own

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def signal_group(self, sig: int) -> None: ...


class FreshJob:
    """A job exec'd as a new process, as a starter does."""

    note = ""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def signal_group(self, sig: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


@dataclass
class JobResult:
    return_value: int  # what DAGMan passes to a POST script as $RETURN
    removed: bool = False
    reason: str = ""
    evicted: bool = False  # back in the queue, to run again on the next slot it gets


class JobProcess:
    """One job cluster (one proc). Each `run()` is one match to a slot, until the job leaves
    the queue or is evicted (then `run()` again); `leave_queue()` drops its spool.

    Self-checkpointing (`checkpoint_exit_code`): when the job exits with that code, its
    `transfer_checkpoint_files` are copied to the job's spool and the job is restarted in the
    same sandbox; a job evicted later starts its next run with the spool's files among its
    inputs, as a pool's starter hands them to whatever machine it lands on.
    """

    def __init__(
        self,
        spec: JobSpec,
        cluster: int,
        node: str,
        scratch_root: Path,
        cancel: threading.Event,
        on_running: Callable[[], None],
        warm: WarmPool | None = None,
        evictions: Evictions | None = None,
        fault_node: int | None = None,
    ) -> None:
        self.spec = spec
        self.warm = warm
        self.evictions = evictions
        self.fault_node = fault_node  # the node its VARS name, for [faults] evict
        self.times_evicted = 0
        self.cluster = cluster
        self.cancel = cancel
        self.on_running = on_running
        self.log = UserLog(spec.log, cluster, node)
        # Every job gets a scratch directory for its job ad and temporary files, removed when it
        # leaves its slot; a sandboxed job also runs there, the others run in initialdir.
        self.scratch = scratch_root / f"{node}.{cluster}"
        self.sandbox = self.scratch if spec.sandboxed else None
        self.spool = scratch_root / f"{node}.{cluster}.spool"  # its checkpoint, on the AP
        self.ad_file = self.scratch / ".job.ad"
        self.ad = self._initial_ad()
        self.slot = 0
        self.slot_environment: dict[str, str] = {}

    def _initial_ad(self) -> classad2.ClassAd:
        now = int(time.time())
        spec = self.spec
        ad = classad2.ClassAd()
        for name, value in spec.attributes.items():
            ad[name] = classad2.ExprTree(value)
        fields = {
            "ClusterId": self.cluster, "ProcId": 0, "JobStatus": IDLE, "QDate": now,
            "EnteredCurrentStatus": now, "JobUniverse": _UNIVERSE[spec.universe],
            "Cmd": str(spec.executable), "Iwd": str(spec.initialdir), "NumJobStarts": 0,
            "RequestCpus": spec.request_cpus, "RequestMemory": spec.request_memory_mb,
            "RequestDisk": spec.request_disk_kb, "HoldReasonCode": 0, "HoldReasonSubCode": 0,
        }  # fmt: skip
        for name, value in fields.items():
            ad[name] = value
        if spec.allowed_job_duration is not None:
            ad["AllowedJobDuration"] = spec.allowed_job_duration
        if spec.checkpoint_exit_code is not None:
            ad["CheckpointExitCode"] = spec.checkpoint_exit_code
        ad["CurrentTime"] = classad2.ExprTree("time()")
        return ad

    def _set_status(self, status: int) -> None:
        self.ad["JobStatus"] = status
        self.ad["EnteredCurrentStatus"] = int(time.time())

    def _periodic_remove(self) -> bool:
        if self.spec.periodic_remove is None:
            return False
        return classad2.ExprTree(self.spec.periodic_remove).eval(self.ad) is True

    def _removed(self, reason: str) -> JobResult:
        self.log.aborted(reason)
        return JobResult(REMOVED_RETURN, removed=True, reason=reason)

    def _hold(self, code: int, subcode: int, reason: str) -> JobResult:
        """Hold, then let periodic_remove decide; nothing would ever release the job, so a
        hold that policy does not remove is removed anyway instead of stalling the DAG."""
        self.log.held(reason, code, subcode)
        self._set_status(HELD)
        self.ad["HoldReasonCode"] = code
        self.ad["HoldReasonSubCode"] = subcode
        self.ad["HoldReason"] = reason
        if self._periodic_remove():
            return self._removed(f"periodic_remove evaluated to TRUE while held: {reason}")
        return self._removed(f"held and never released (local runner removes it): {reason}")

    def _environment(self, cwd: Path) -> dict[str, str]:
        """As a starter sets it: temporary files go to the scratch directory, never to
        initialdir (a local-universe job runs in the run directory itself). The slot's variables
        yield to the job's own, as a machine's STARTER_JOB_ENVIRONMENT does."""
        env = {"PATH": _BASE_PATH, **self.slot_environment, **self.spec.environment}
        if self.spec.universe == "vanilla":
            env.update(dict.fromkeys(THREAD_VARIABLES, str(self.spec.request_cpus)))
        scratch = str(self.scratch)
        env.update(
            BATCH_SYSTEM="HTCondor",
            _CONDOR_SCRATCH_DIR=scratch,
            _CONDOR_JOB_AD=str(self.ad_file),
            _CONDOR_JOB_IWD=str(cwd),
            TMPDIR=scratch,
            TMP=scratch,
            TEMP=scratch,
        )
        return env

    def run(self, slot: int = 0, slot_environment: dict[str, str] | None = None) -> JobResult:
        """Run on `slot` (a machine whose jobs get `slot_environment`) until the job exits, is
        removed or held, or is evicted."""
        self.slot, self.slot_environment = slot, slot_environment or {}
        if self.ad["NumJobStarts"] == 0:
            self.log.submitted()
        try:
            if self.sandbox is not None:
                inputs = stage_in(self.spec, self.sandbox)
                restore_checkpoint(self.spool, self.sandbox)
            else:
                self.scratch.mkdir(parents=True)
                inputs = {}
        except FileNotFoundError as exc:
            shutil.rmtree(self.scratch, ignore_errors=True)
            return self._hold(HOLD_TRANSFER_INPUT, 2, f"Transfer input files failure: {exc}")
        try:
            return self._execute(inputs)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def leave_queue(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)

    def _execute(self, inputs: dict[str, float]) -> JobResult:
        spec = self.spec
        cwd = self.sandbox if self.sandbox is not None else spec.initialdir
        out = self.sandbox / "_condor_stdout" if self.sandbox else spec.output
        err = self.sandbox / "_condor_stderr" if self.sandbox else spec.error
        self._set_status(RUNNING)
        placed = time.monotonic()
        self.ad["JobCurrentStartDate"] = int(time.time())
        self.ad["NumJobStarts"] = self.ad["NumJobStarts"] + 1
        self.ad_file.write_text(str(self.ad))
        self.log.executing(self.slot)
        restarted = False
        while True:
            # A restart after a checkpoint goes on in the same sandbox, its streams appended.
            with _open_or_null(out, restarted) as stdout, _open_or_null(err, restarted) as stderr:
                proc = self._start(cwd, stdout, stderr)
            if not restarted:
                self.on_running()
            stopped = self._watch(proc, placed)
            if proc.note and err is not None:
                with err.open("a") as stream:
                    stream.write(proc.note)
            if stopped is not None:
                self._copy_streams()
                return stopped
            returned = proc.wait()
            if not self._checkpointed(returned):
                self._copy_streams()
                break
            missing = save_checkpoint(spec, cwd, self.spool)
            if missing:
                reason = f"Transfer checkpoint files failure: {', '.join(missing)} not found"
                return self._hold(HOLD_TRANSFER_OUTPUT, 2, reason)
            self.log.checkpoint_transferred()
            restarted = True
        code = returned if returned >= 0 else None
        sig = -returned if returned < 0 else None
        if self.sandbox is not None and should_transfer_output(spec, code):
            missing = stage_out(spec, self.sandbox, inputs)
            if missing:
                reason = f"Transfer output files failure: {', '.join(missing)} not found"
                return self._hold(HOLD_TRANSFER_OUTPUT, 2, reason)
        self.log.terminated(code, sig)
        return JobResult(code if code is not None else -(sig or 0))

    def _checkpointed(self, returned: int) -> bool:
        return returned == self.spec.checkpoint_exit_code

    def _copy_streams(self) -> None:
        """A sandboxed job's output and error, to where its submit file names them."""
        if self.sandbox is not None:
            _copy_stream(self.sandbox / "_condor_stdout", self.spec.output)
            _copy_stream(self.sandbox / "_condor_stderr", self.spec.error)

    def _start(self, cwd: Path, stdout: IO[bytes] | int, stderr: IO[bytes] | int) -> RunningJob:
        """In a warm interpreter when the job may go warm (warm_pool), else a fresh process."""
        command = [command_path(self.spec, self.sandbox), *self.spec.arguments]
        env = self._environment(cwd)
        if self.warm is not None:
            job = self.warm.start(command, cwd, env, (stdout, stderr), self.cancel)
            if job is not None:
                return job
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            start_new_session=True, preexec_fn=die_with_runner(),
        )  # fmt: skip
        return FreshJob(proc)

    def _watch(self, proc: RunningJob, placed: float) -> JobResult | None:
        """Wait for exit while enforcing policy; a result here means the job did not exit."""
        next_check = time.monotonic() + POLICY_INTERVAL
        started = time.time()
        while proc.poll() is None:
            if self.cancel.wait(0.1):
                _kill_group(proc)
                return self._removed("removed: the local runner was interrupted")
            evictions = self.evictions
            if evictions and evictions.due(self.slot, placed, self.fault_node, self.times_evicted):
                _kill_group(proc)
                self.times_evicted += 1
                self.log.evicted()
                self._set_status(IDLE)
                return JobResult(0, evicted=True, reason=f"evicted from slot {self.slot}")
            if time.monotonic() < next_check:
                continue
            next_check += POLICY_INTERVAL
            limit = self.spec.allowed_job_duration
            if limit is not None and time.time() - started > limit:
                _kill_group(proc)
                return self._hold(
                    HOLD_DURATION, 0, f"The job exceeded allowed job duration of {limit}s"
                )
            if self._periodic_remove():
                _kill_group(proc)
                expr = self.spec.periodic_remove
                return self._removed(f"The job attribute PeriodicRemove expression '{expr}' "
                                     "evaluated to TRUE")  # fmt: skip
        return None


def _open_or_null(path: Path | None, append: bool) -> AbstractContextManager[IO[bytes] | int]:
    if path is None:
        return nullcontext(subprocess.DEVNULL)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab" if append else "wb")


def _copy_stream(src: Path, dst: Path | None) -> None:
    if dst is not None and src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _kill_group(proc: RunningJob) -> None:
    """SIGTERM the job's process group, SIGKILL after a grace period, like a starter."""
    proc.signal_group(signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE)
    proc.signal_group(signal.SIGKILL)  # also whatever the job left behind in its group
    proc.wait()
