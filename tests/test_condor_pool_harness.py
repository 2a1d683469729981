"""The personal pool runs real DAGs, and pins the DAGMan behaviour the local emulator copies."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.condor_pool.pool import CondorPool
from tests.timing import wait_s

pytestmark = pytest.mark.pool

# POST script recording what DAGMan passed it, then succeeding so the DAG goes on.
RECORD_POST = '#!/bin/sh\necho "$1 $2" >> post.log\nexit 0\n'


def _write(directory: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


def _shell_job(directory: Path, name: str, script: str, extra: str = "") -> None:
    """A vanilla job running ``script`` with /bin/sh in the submit directory (no transfer)."""
    _write(directory, f"{name}.sh", f"#!/bin/sh\n{script}\n", 0o755)
    _write(
        directory,
        f"{name}.sub",
        f"executable = {name}.sh\nshould_transfer_files = NO\nlog = {name}.log\n"
        f"output = {name}.stdout\nerror = {name}.stderr\n{extra}queue\n",
    )


def _run_dag(pool: CondorPool, dag: Path, timeout_s: float = 120) -> int:
    pool.submit_dag(dag)
    return pool.wait_dag(dag, timeout_s)


def _post_returns(directory: Path) -> dict[str, int]:
    lines = (directory / "post.log").read_text().splitlines()
    return {node: int(value) for node, value in (line.split() for line in lines)}


def test_diamond_dag_completes(condor_pool: CondorPool, condor_workdir: Path) -> None:
    for node in "ABC":
        _shell_job(condor_workdir, node, f"echo {node} > {node}.out")
    _shell_job(condor_workdir, "D", "cat B.out C.out > D.out")
    dag = _write(
        condor_workdir,
        "diamond.dag",
        "".join(f"JOB {node} {node}.sub\n" for node in "ABCD")
        + "PARENT A CHILD B C\nPARENT B C CHILD D\n",
    )
    started = time.monotonic()
    assert _run_dag(condor_pool, dag) == 0, condor_pool.daemon_log_tail()
    print(f"diamond DAG wall time: {time.monotonic() - started:.1f} s")
    assert (condor_workdir / "A.out").read_text() == "A\n"
    assert (condor_workdir / "D.out").read_text() == "B\nC\n"


def test_host_venv_python_imports_torch(condor_pool: CondorPool, condor_workdir: Path) -> None:
    _write(
        condor_workdir,
        "probe.py",
        "import sys, torch\n"
        "open('probe.txt', 'w').write(f'{sys.prefix} {torch.tensor([2, 3]).sum().item()}')\n",
    )
    # The venv's interpreter is used in place (not transferred): it finds the venv beside it.
    _write(
        condor_workdir,
        "probe.sub",
        f"executable = {sys.executable}\ntransfer_executable = False\narguments = probe.py\n"
        "should_transfer_files = YES\ntransfer_input_files = probe.py\n"
        "when_to_transfer_output = ON_EXIT\ntransfer_output_files = probe.txt\n"
        "log = probe.log\noutput = probe.stdout\nerror = probe.stderr\nqueue\n",
    )
    dag = _write(condor_workdir, "probe.dag", "JOB probe probe.sub\n")
    assert _run_dag(condor_pool, dag) == 0, (condor_workdir / "probe.stderr").read_text()
    assert (condor_workdir / "probe.txt").read_text() == f"{sys.prefix} 5"


def test_post_script_return_values(condor_pool: CondorPool, condor_workdir: Path) -> None:
    """$RETURN: the exit code; minus the signal number; -1002 when the job was removed."""
    _shell_job(condor_workdir, "exit3", "exit 3")
    _shell_job(condor_workdir, "killed", "kill -KILL $$")
    _shell_job(
        condor_workdir, "removed", "sleep 60", extra="periodic_remove = (time() - QDate) > 5\n"
    )
    _write(condor_workdir, "post.sh", RECORD_POST, 0o755)
    nodes = ("exit3", "killed", "removed")
    dag = _write(
        condor_workdir,
        "returns.dag",
        "".join(f"JOB {n} {n}.sub\nSCRIPT POST {n} post.sh $JOB $RETURN\n" for n in nodes),
    )
    assert _run_dag(condor_pool, dag) == 0
    assert _post_returns(condor_workdir) == {"exit3": 3, "killed": -9, "removed": -1002}


def test_post_success_on_last_retry_completes_node(
    condor_pool: CondorPool, condor_workdir: Path
) -> None:
    """A POST script returning 0 after the job failed on its last retry marks the node done."""
    _shell_job(condor_workdir, "flaky", "exit 1")
    _shell_job(condor_workdir, "after", "echo ran > after.out")
    _write(
        condor_workdir,
        "post.sh",
        '#!/bin/sh\necho "$2 $1" >> post.log\n[ "$2" = "$3" ] && exit 0\nexit "$1"\n',
        0o755,
    )
    dag = _write(
        condor_workdir,
        "retry.dag",
        "JOB flaky flaky.sub\nJOB after after.sub\nRETRY flaky 1\n"
        "SCRIPT POST flaky post.sh $RETURN $RETRY $MAX_RETRIES\nPARENT flaky CHILD after\n",
    )
    assert _run_dag(condor_pool, dag) == 0
    # Retry 0 failed (POST passed the job's 1 on), retry 1 = MAX_RETRIES was turned into success.
    assert (condor_workdir / "post.log").read_text() == "0 1\n1 1\n"
    assert (condor_workdir / "after.out").read_text() == "ran\n"
    assert not list(condor_workdir.glob("retry.dag.rescue*"))


@pytest.mark.parametrize(
    ("transfer", "outcome"),
    [
        ("when_to_transfer_output = ON_EXIT", "held"),
        # ON_SUCCESS alone still transfers, and holds: success is only defined by the next knob.
        ("when_to_transfer_output = ON_SUCCESS", "held"),
        # success_exit_code also makes HTCondor requeue failures: max_retries = 0 stops that.
        ("when_to_transfer_output = ON_SUCCESS\nsuccess_exit_code = 0\nmax_retries = 0", "exit 1"),
    ],
    ids=["on_exit", "on_success", "on_success_with_exit_code"],
)
def test_missing_output_of_failed_job(
    condor_pool: CondorPool, condor_workdir: Path, transfer: str, outcome: str
) -> None:
    """Which transfer settings let a failed job without its output file end instead of hold."""
    _write(
        condor_workdir,
        "fail.sub",
        "executable = /bin/sh\narguments = \"-c 'exit 1'\"\ntransfer_executable = False\n"
        f"should_transfer_files = YES\n{transfer}\n"
        "transfer_output_files = missing.txt\nlog = fail.log\nqueue\n",
    )
    submit = condor_pool.run(["condor_submit", "fail.sub"], cwd=condor_workdir)
    assert submit.returncode == 0, submit.stderr
    try:
        assert _first_outcome(condor_workdir / "fail.log") == outcome
        executions = re.findall(r"^001 ", (condor_workdir / "fail.log").read_text(), re.MULTILINE)
        assert len(executions) == 1
    finally:
        condor_pool.run(["condor_rm", "-all"], cwd=condor_workdir)


def _first_outcome(log: Path) -> str:
    """'held' or 'exit N', from the first hold (012) or termination (005) event in a user log."""
    timeout_s = wait_s(60, 6)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if re.search(r"^012 ", text, re.MULTILINE):
            return "held"
        found = re.search(r"^005 (?s:.*?)return value (\d+)", text, re.MULTILINE)
        if found:
            return f"exit {found.group(1)}"
        time.sleep(0.5)
    raise AssertionError(f"no termination or hold event in {log} after {timeout_s} s")
