"""Resuming: after SIGKILL of the runner (journal), after a failed DAG (rescue), SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_local_runner_helpers import dag, job

from pipeline.local_runner import run_dag
from tests.timing import wait_s

RUNNER = """
import sys
from pathlib import Path
from pipeline.local_runner import DagInterrupted, run_dag
try:
    run_dag(Path(sys.argv[1]), slots=1)
except DagInterrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _chain(tmp_path: Path, runs: Path) -> Path:
    """A -> B -> C; B waits for a flag file on its first run so the test can kill mid-node."""
    job(tmp_path, "A", f"echo A >> {runs}")
    # b.pid appears whole (renamed into place): the test reads it as soon as it exists
    job(tmp_path, "B", f"echo B >> {runs}; echo $$ > {tmp_path}/b.tmp\n"
        f"mv {tmp_path}/b.tmp {tmp_path}/b.pid\n"
        f"while [ ! -e {tmp_path}/go ]; do sleep 0.05; done")  # fmt: skip
    job(tmp_path, "C", f"echo C >> {runs}")
    return dag(
        tmp_path, "JOB A A.sub\nJOB B B.sub\nJOB C C.sub\nPARENT A CHILD B\nPARENT B CHILD C\n"
    )


def _start(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], stderr=subprocess.PIPE)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + wait_s(15, 2)
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_resume_after_sigkill_reruns_only_unfinished_nodes(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    path = _chain(tmp_path, runs)
    proc = _start(path)
    _wait_for(tmp_path / "b.pid")
    proc.kill()
    proc.wait()
    os.kill(int((tmp_path / "b.pid").read_text()), signal.SIGKILL)  # the orphaned job
    (tmp_path / "b.pid").unlink()
    (tmp_path / "go").touch()
    assert run_dag(path, slots=1).ok
    assert runs.read_text().split() == ["A", "B", "B", "C"]


def test_rescue_dag_is_written_and_used(tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    job(tmp_path, "A", f"echo A >> {runs}")
    job(tmp_path, "B", f"echo B >> {runs}; test -e {tmp_path}/fixed")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nPARENT A CHILD B\n")
    first = run_dag(path, slots=1)
    assert not first.ok and first.rescue_file is not None
    assert "DONE A" in first.rescue_file.read_text().splitlines()
    (tmp_path / "fixed").touch()
    assert run_dag(path, slots=1).ok
    assert runs.read_text().split() == ["A", "B", "B"]


def test_sigterm_kills_jobs_and_exits_nonzero(tmp_path: Path) -> None:
    path = _chain(tmp_path, tmp_path / "runs.txt")
    proc = _start(path)
    _wait_for(tmp_path / "b.pid")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=wait_s(15, 2))
    assert proc.returncode == 128 + signal.SIGTERM
    assert b"run again to resume" in err
    pid = int((tmp_path / "b.pid").read_text())
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
    assert (tmp_path / ".local_runner" / "test.dag.journal").read_text() == "DONE A\n"
