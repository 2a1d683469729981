"""One DAG node's life: PRE script, job, POST script, retries; DAGMan's success rules.

Runs in its own thread and reports to the scheduler only through callbacks, so all DAG state
stays in the scheduler's thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from pipeline.dag.model import Node, Script

from .job_process import REMOVED_RETURN, JobProcess, JobResult
from .parent_death import die_with_runner
from .slots import Evictions
from .status_file import POSTRUN, PRERUN, READY, SUBMITTED
from .submit_description import load_job
from .warm_pool import WarmPool


@dataclass(frozen=True)
class Outcome:
    """How a node ended; `code` is the exit value of the component that ran last."""

    ok: bool
    code: int
    attempts: int
    abort: bool = False


@dataclass
class NodeContext:
    """What a node needs from the DAG around it, read when each attempt starts."""

    scratch_root: Path
    cancel: threading.Event
    acquire_slot: Callable[[Node], int | None]
    release_slot: Callable[[Node, int, bool], None]
    next_cluster: Callable[[], int]
    dag_status: Callable[[], tuple[int, int]]  # ($DAG_STATUS, $FAILED_COUNT)
    emit: Callable[[str, str, int, int | None], None]  # node, kind, attempt, exit code
    set_state: Callable[[str, int, str, int], None]  # node, status, details, retry count
    slot_environment: dict[int, dict[str, str]]  # slot -> variables its jobs get
    warm: WarmPool | None = None  # warm interpreters for payload jobs (None: all start fresh)
    evictions: Evictions | None = None  # `dagtrain run --evict`: when each slot's job is evicted


class NodeRunner:
    def __init__(self, node: Node, ctx: NodeContext) -> None:
        self.node = node
        self.ctx = ctx

    def run(self) -> Outcome:
        """Attempts until success, retries run out, UNLESS-EXIT matches or the DAG aborts."""
        node = self.node
        attempt = 0
        while True:
            ok, code = self._attempt(attempt)
            abort = node.abort_on is not None and code == node.abort_on[0]
            if ok or abort or self.ctx.cancel.is_set():
                return Outcome(ok, code, attempt + 1, abort=abort and not ok)
            if attempt >= node.retries or code == node.unless_exit:
                return Outcome(False, code, attempt + 1)
            self.ctx.emit(node.name, "retry", attempt, code)
            attempt += 1

    def _attempt(self, attempt: int) -> tuple[bool, int]:
        node = self.node
        pre_code = -1
        if node.pre is not None:
            self.ctx.set_state(node.name, PRERUN, "", attempt)
            pre_code = self._script(node.pre, attempt, {})
            if node.pre_skip is not None and pre_code == node.pre_skip:
                return True, 0
            if pre_code != 0:
                return False, pre_code
        self.ctx.set_state(node.name, READY, "waiting for a slot", attempt)
        slot = self.ctx.acquire_slot(node)
        if slot is None:
            return False, -1
        cluster, result = self._job(attempt, slot)
        if result.removed:
            self.ctx.emit(node.name, "removed", attempt, result.return_value)
        if self.ctx.cancel.is_set():
            # Stopped by the runner's interrupt, not by the node: no POST script may count it
            # (as missing, say); the resumed run runs the node again.
            return False, result.return_value
        if node.post is None:
            return result.return_value == 0, result.return_value
        self.ctx.set_state(node.name, POSTRUN, "", attempt)
        macros = {"$RETURN": str(result.return_value), "$PRE_SCRIPT_RETURN": str(pre_code),
                  "$JOBID": f"{cluster}.0"}  # fmt: skip
        post_code = self._script(node.post, attempt, macros)
        return post_code == 0, post_code

    def _job(self, attempt: int, slot: int) -> tuple[int, JobResult]:
        node, ctx = self.node, self.ctx
        cluster = ctx.next_cluster()
        dag_status, failed = ctx.dag_status()
        dagman = {"$(RETRY)": str(attempt), "$(JOB)": node.name}
        variables = {k: _expand(v, dagman) for k, v in node.vars.items()}
        if node.final:
            variables |= {"DAG_STATUS": str(dag_status), "FAILED_COUNT": str(failed)}
        spec = load_job(node.submit_file, node.directory, variables, cluster)
        self.ctx.emit(node.name, "submitted", attempt, None)
        ctx.set_state(node.name, SUBMITTED, "idle", attempt)

        def running() -> None:
            ctx.set_state(node.name, SUBMITTED, "running", attempt)
            ctx.emit(node.name, "running", attempt, None)

        job = JobProcess(
            spec, cluster, node.name, ctx.scratch_root, ctx.cancel, running, ctx.warm,
            ctx.evictions, _node_number(node),
        )  # fmt: skip
        held: int | None = slot
        try:
            while True:
                result = job.run(slot, ctx.slot_environment.get(slot, {}))
                if not result.evicted:
                    return cluster, result
                # Back in the queue, keeping its MAXJOBS place: the slot goes to whoever ranks
                # first, this job included.
                ctx.emit(node.name, "evicted", attempt, None)
                ctx.set_state(node.name, SUBMITTED, "idle (evicted)", attempt)
                ctx.release_slot(node, slot, True)
                held = ctx.acquire_slot(node)
                if held is None:  # the DAG is stopping
                    return cluster, JobResult(REMOVED_RETURN, removed=True, reason="stopped")
                slot = held
        finally:
            if held is not None:
                ctx.release_slot(node, held, False)
            job.leave_queue()

    def _script(self, script: Script, attempt: int, extra: dict[str, str]) -> int:
        """Run a PRE/POST script from the node's directory; whole-argument $MACROs only."""
        dag_status, failed = self.ctx.dag_status()
        macros = {"$JOB": self.node.name, "$RETRY": str(attempt),
                  "$MAX_RETRIES": str(self.node.retries), "$DAG_STATUS": str(dag_status),
                  "$FAILED_COUNT": str(failed), **extra}  # fmt: skip
        args = [macros.get(arg, arg) for arg in script.args]
        exe = self.node.directory / script.executable
        command = [str(exe) if exe.exists() else script.executable, *args]
        while True:
            code = _run_cancellable(command, self.node.directory, self.ctx.cancel)
            if script.defer_status is None or code != script.defer_status:
                return code
            if self.ctx.cancel.wait(script.defer_time):
                return code


def _node_number(node: Node) -> int | None:
    """The training node a DAG node's job stands for (its VARS node), if it names one."""
    value = node.vars.get("node", "")
    return int(value) if value.isdigit() else None


def _expand(value: str, macros: dict[str, str]) -> str:
    """DAGMan's own macros in a VARS value, filled in when the job is submitted."""
    for macro, text in macros.items():
        value = value.replace(macro, text)
    return value


def _run_cancellable(command: list[str], cwd: Path, cancel: threading.Event) -> int:
    """Exit status (negative signal number if killed); killed with its group on cancel."""
    try:
        proc = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_runner(),
        )  # fmt: skip
    except OSError:
        return 1  # DAGMan counts a script it cannot start as a failed script
    while proc.poll() is None:
        if cancel.wait(0.05):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
