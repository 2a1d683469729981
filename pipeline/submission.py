"""`dagtrain submit` and `dagtrain status` on this machine's HTCondor schedd.

Submission goes through the htcondor2 bindings (the same DAGMan submit description
condor_submit_dag would write), from inside the run directory so the DAG's relative paths
resolve. Every check that can refuse a submission runs before anything is submitted or changed.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import htcondor2

from node_payload.common.errors import UserError
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import CONFIG_FILE, DAG_FILE, REPORT_FILE
from pipeline.rescue import reopen_missing_nodes
from pipeline.run_lock import RunLock
from pipeline.run_status import RunStatus, read_status

# What `dagtrain plan` writes and a submission needs; a partial copy is refused up front.
RUN_FILES = (DAG_FILE, CONFIG_FILE, "submit/node.sub", "submit/report.sub", "payload/dagtrain.pyz")
MODE_FILES = {
    "sync": ("submit/aggregate.sub", "scripts/node_post.sh"),
    "async": ("scripts/lane.sh", "async/state.json"),
}
SCHEDULER_UNIVERSE = 7  # DAGMan itself runs as a scheduler-universe job
ACTIVE_JOB = "JobStatus =!= 3 && JobStatus =!= 4"  # neither removed nor completed
INSTALL_HINT = (
    "install HTCondor (https://htcondor.readthedocs.io/en/latest/getting-htcondor/), "
    "or submit from a host that has it with --remote user@host"
)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a directory that is not a complete planned run."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; plan one with `dagtrain plan`")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if not missing:
        mode = read_run_config(run_dir / CONFIG_FILE).run.mode
        missing = [name for name in MODE_FILES[mode] if not (run_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{run_dir}: incomplete run directory, missing {', '.join(missing)}; "
            "plan it again with `dagtrain plan` (or copy the whole directory)"
        )


def check_not_finished(run_dir: Path) -> None:
    """A completed run is kept as it is: submitting it again would redo nothing useful."""
    report = run_dir / REPORT_FILE
    if not report.is_file():
        return
    with contextlib.suppress(ValueError, OSError):
        data = json.loads(report.read_text())
        if data.get("status") == "completed":
            done = data.get("summary") or f"{data.get('rounds_completed')} rounds"
            raise UserError(
                f"{run_dir}: this run already completed ({done}, "
                f"final held-out accuracy {data.get('final_accuracy')}; see {report}); "
                "plan a new run directory to train again"
            )


def dag_options(maxjobs: int | None, maxidle: int | None) -> dict[str, int]:
    """condor_submit_dag's -maxjobs/-maxidle: node jobs submitted at once, node jobs idle at once."""
    options = {}
    for key, value in (("maxjobs", maxjobs), ("maxidle", maxidle)):
        if value is None:
            continue
        if value < 1:
            raise UserError(f"--{key} must be at least 1 (leave it out for no limit), not {value}")
        options[key] = value
    return options


# What a 23.x schedd answers bindings of 24.x or later, which bind FS authentication to its address.
_CHANNEL_BINDING = "Directory name doesn't match"


def refused(what: str, exc: htcondor2.HTCondorException) -> UserError:
    """One message; a client/schedd version mismatch names the setting that fixes it."""
    if _CHANNEL_BINDING not in str(exc):
        return UserError(f"{what}: {exc}")
    return UserError(
        f"{what}: the schedd refused this client's FS authentication. The htcondor bindings here "
        f"({htcondor2.version().split()[1]}) bind it to the server's address, which schedds "
        "before 24.0 do not; set SEC_FS_ENFORCE_CHANNEL_BINDING = False in this client's HTCondor "
        "configuration (or export _CONDOR_SEC_FS_ENFORCE_CHANNEL_BINDING=False), or install the "
        "bindings of the schedd's version (pip install 'htcondor==X.Y.*')"
    )


def schedd() -> htcondor2.Schedd:
    try:
        return htcondor2.Schedd()
    except htcondor2.HTCondorException as exc:
        raise UserError(
            f"no HTCondor schedd found on this machine ({exc}); is HTCondor running, and does "
            f"CONDOR_CONFIG name its configuration? Otherwise {INSTALL_HINT}"
        ) from None


def running_dagman(queue: htcondor2.Schedd, run_dir: Path) -> int | None:
    """The cluster of a DAGMan job still queued for this run directory, if any."""
    try:
        ads = queue.query(
            f"JobUniverse == {SCHEDULER_UNIVERSE} && {ACTIVE_JOB}", ["ClusterId", "Iwd"]
        )
    except htcondor2.HTCondorException as exc:
        raise refused("cannot reach the HTCondor schedd", exc) from None
    for ad in ads:
        with contextlib.suppress(OSError, KeyError):
            if os.path.samefile(ad["Iwd"], run_dir):
                return int(ad["ClusterId"])
    return None


def submit(run_dir: Path, maxjobs: int | None = None, maxidle: int | None = None) -> int:
    """Submit (or resubmit after a failure) a planned run; returns DAGMan's cluster id."""
    run_dir = run_dir.resolve()
    check_run_dir(run_dir)
    with RunLock(run_dir, "submit"):  # not while `dagtrain run` runs it here
        return _submit(run_dir, maxjobs, maxidle)


def _submit(run_dir: Path, maxjobs: int | None, maxidle: int | None) -> int:
    check_not_finished(run_dir)
    options = dag_options(maxjobs, maxidle)
    if shutil.which("condor_dagman") is None:
        raise UserError(f"condor_dagman is not on PATH: {INSTALL_HINT}")
    queue = schedd()
    cluster = running_dagman(queue, run_dir)
    if cluster is not None:
        raise UserError(
            f"{run_dir}: already submitted and still running as DAGMan job {cluster}; "
            f"watch it with `dagtrain status {run_dir} --watch`, or stop it with "
            f"`dagtrain rm {run_dir}` before submitting again"
        )
    reopen_missing_nodes(run_dir)
    with contextlib.chdir(run_dir):
        try:
            description = htcondor2.Submit.from_dag(DAG_FILE, options)
        except htcondor2.HTCondorException as exc:
            raise UserError(f"{run_dir}: cannot prepare the DAG for submission: {exc}") from None
        try:
            result = queue.submit(description)
        except htcondor2.HTCondorException as exc:
            raise refused(f"the HTCondor schedd refused the DAG of {run_dir}", exc) from None
    return result.cluster()


def status(run_dir: Path) -> RunStatus:
    """The run's status, from its status file, job logs and round metrics."""
    return read_status(run_dir.resolve())
