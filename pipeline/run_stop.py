"""`dagtrain rm RUN_DIR` (or `stop`): stop a run, keeping what it finished so that it resumes.

A local run is stopped the way Ctrl-C stops it: its runner, the process its lock names
(pipeline.run_lock), gets SIGTERM, kills its node jobs, journals the finished nodes and exits
(143); `dagtrain run` resumes it. A run submitted to this machine's schedd has no such process:
its DAGMan job, found by its working directory as `dagtrain submit` finds it, is removed as
condor_rm would. DAGMan then removes its node jobs, runs the FINAL node (a failed report) and
writes a rescue DAG, so `dagtrain submit` resumes it.
"""

import os
import signal
import time
from pathlib import Path

import htcondor2

from node_payload.common.errors import UserError
from node_payload.common.run_layout import CONFIG_FILE
from pipeline.run_lock import Holder, recorded_holder
from pipeline.run_summary import resume_command
from pipeline.submission import refused, running_dagman, schedd

# A runner stops within a second or two (its jobs are killed, not waited for); this is for a
# machine so loaded that it takes far longer, after which the user is told what else to do.
STOP_WAIT_S = 120.0


def stop_run(run_dir: Path) -> str:
    """Stop whatever runs `run_dir` here; returns what was done, in one line."""
    run_dir = run_dir.resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    holder = recorded_holder(run_dir)
    if holder is not None and holder.command == "run":
        return _stop_runner(run_dir, holder)
    return _remove_dagman(run_dir)


def _stop_runner(run_dir: Path, holder: Holder) -> str:
    if holder.running() is None:
        raise UserError(
            f"{run_dir}: run by {holder.describe()}, another machine; stop it there with "
            "`dagtrain rm`"
        )
    try:
        os.kill(holder.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it ended meanwhile; its record goes with it
    except PermissionError:
        raise UserError(
            f"{run_dir}: run by {holder.describe()}, another user's process; ask them to stop it"
        ) from None
    deadline = time.monotonic() + STOP_WAIT_S
    while recorded_holder(run_dir) == holder:
        if time.monotonic() > deadline:
            raise UserError(
                f"{holder.describe()} was sent SIGTERM and still runs after {STOP_WAIT_S:.0f} "
                f"s; `kill -KILL {holder.pid}` ends it at once (its jobs die with it and the run "
                "still resumes)"
            )
        time.sleep(0.1)
    return f"stopped {holder.describe()}; resume with: {resume_command(run_dir)}"


def _remove_dagman(run_dir: Path) -> str:
    try:
        queue = schedd()
    except UserError as exc:
        raise UserError(
            f"{run_dir}: no `dagtrain run` runs it, and no DAGMan job can be looked for: {exc}"
        ) from None
    cluster = running_dagman(queue, run_dir)
    if cluster is None:
        raise UserError(
            f"{run_dir}: nothing to stop: no `dagtrain run` runs it and this machine's schedd "
            "has no DAGMan job for it"
        )
    try:
        result = queue.act(htcondor2.JobAction.Remove, cluster, reason="dagtrain rm")
    except htcondor2.HTCondorException as exc:
        raise refused(f"cannot remove DAGMan job {cluster}", exc) from None
    if result.get("TotalSuccess", 0) < 1:
        raise UserError(f"the schedd did not remove DAGMan job {cluster}: {dict(result)}")
    return (
        f"removed DAGMan job {cluster} of {run_dir}: DAGMan removes its node jobs and writes a "
        f"rescue DAG (`dagtrain status {run_dir}` shows when it has left); resume with: "
        f"dagtrain submit {run_dir}"
    )
