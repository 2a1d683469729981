"""`dagtrain submit` and `dagtrain status`: throttles, refusals, and the status view, read from
the files the local runner writes (no pool) and from a real DAGMan run (pool)."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import ClassVar

import htcondor2
import pytest
from rich.console import Console

from node_payload.common.errors import UserError
from node_payload.common.run_layout import DAG_FILE, REPORT_FILE, STATUS_FILE, node_dir
from pipeline import cli
from pipeline.local_runner import run_dag
from pipeline.local_runner.event_log import UserLog
from pipeline.local_runner.status_file import NodeState, render, write
from pipeline.run_status import (
    DONE,
    ERROR,
    NOT_READY,
    SUBMITTED,
    node_state,
    read_status,
)
from pipeline.run_status import render as render_status
from pipeline.submission import dag_options, submit
from tests.condor_pool.pool import CondorPool
from tests.timing import wait_s

NODE_SUB = """universe = vanilla
executable = /bin/sh
transfer_executable = false
arguments = "../../../scripts/node.sh $(attempt) $(ntag)"
initialdir = rounds/$(rtag)/$(ntag)
should_transfer_files = NO
log = job.log
output = job.out
error = job.err
queue
"""
AGGREGATE_SUB = """universe = vanilla
executable = /bin/sh
transfer_executable = false
arguments = "scripts/aggregate.sh $(rtag) $(accuracy)"
should_transfer_files = NO
log = rounds/$(rtag)/aggregate.log
queue
"""
REPORT_SUB = """universe = vanilla
executable = /bin/sh
transfer_executable = false
arguments = "scripts/report.sh $(DAG_STATUS)"
should_transfer_files = NO
log = report.log
queue
"""
AGGREGATE_SH = """printf '{"accuracy": %s}\\n' "$2" > "rounds/$1/round.json"\n"""
# Like the real report job, the FINAL node fails a failed DAG (else DAGMan calls it a success).
REPORT_SH = """[ "$1" = 0 ] && s=completed || s=failed
printf '{"status": "%s"}\\n' "$s" > report.json
[ "$1" = 0 ]
"""


def fake_run(
    run_dir: Path, rounds: int = 2, nodes: int = 3, script: str = "true", retries: int = 1
) -> Path:
    """A run directory laid out as the planner's, whose jobs are shell scripts.

    Node jobs run ``script`` with $1 = DAGMan's retry number and $2 = the node tag (n000...);
    round r's aggregation writes accuracy 0.5 + r/10 to round.json; the FINAL node writes
    report.json. Node names, job logs, status file and round metrics are where the real ones are.
    """
    for sub in ("submit", "scripts", "payload"):
        (run_dir / sub).mkdir(parents=True)
    (run_dir / "payload/dagtrain.pyz").write_text("")
    scripts = {"node_post.sh": "exit $1\n", "node.sh": script + "\n",
               "aggregate.sh": AGGREGATE_SH, "report.sh": REPORT_SH}  # fmt: skip
    for name, body in scripts.items():
        (run_dir / "scripts" / name).write_text("#!/bin/sh\n" + body)
        (run_dir / "scripts" / name).chmod(0o755)
    (run_dir / "config.toml").write_text(
        f'[run]\nname = "fake"\nnodes = {nodes}\nrounds = {rounds}\n'
        "[data]\n[model]\n[train]\n[server]\n"
    )
    (run_dir / "submit/node.sub").write_text(NODE_SUB)
    (run_dir / "submit/aggregate.sub").write_text(AGGREGATE_SUB)
    (run_dir / "submit/report.sub").write_text(REPORT_SUB)
    lines = [f"NODE_STATUS_FILE {STATUS_FILE} 1"]
    for r in range(rounds):
        names = []
        for n in range(nodes):
            name = f"train_r{r:03d}_n{n:03d}"
            names.append(name)
            node_dir(run_dir, r, n).mkdir(parents=True)
            lines += [
                f"JOB {name} submit/node.sub",
                f'VARS {name} rtag="r{r:03d}" ntag="n{n:03d}" attempt="$(RETRY)"',
                f"RETRY {name} {retries}",
                f"SCRIPT POST {name} scripts/node_post.sh $RETURN",
            ]
        aggregate = f"aggregate_r{r:03d}"
        lines += [
            f"JOB {aggregate} submit/aggregate.sub",
            f'VARS {aggregate} rtag="r{r:03d}" accuracy="0.{5 + r}"',
            f"PARENT {' '.join(names)} CHILD {aggregate}",
        ]
        if r:
            lines.append(f"PARENT aggregate_r{r - 1:03d} CHILD {' '.join(names)}")
    lines.append("FINAL report submit/report.sub")
    (run_dir / DAG_FILE).write_text("\n".join(lines) + "\n")
    return run_dir


def _text(status: object) -> str:
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(render_status(status))  # type: ignore[arg-type]
    return console.export_text()


# ---------------------------------------------------------------- status view, no pool


def test_status_of_a_local_runner_run(tmp_path: Path) -> None:
    # Node 1 of each round fails its first try: one retry per round.
    run = fake_run(tmp_path / "run", script='test "$1" -ge 1 || test "$2" != n001')
    assert run_dag(run / DAG_FILE, slots=2).ok
    status = read_status(run)
    assert status.state == "done" and status.ended and status.report_status == "completed"
    assert [r.nodes["done"] for r in status.rounds] == [3, 3]
    assert [r.retries for r in status.rounds] == [1, 1]
    assert status.accuracy == [0.5, 0.6]
    assert all(r.aggregate == "done" for r in status.rounds)
    text = _text(status)
    assert "done: round 2/2, 2 retries, held-out accuracy 0.500 0.600; report: completed" in text
    assert re.search(r"r001 +0 +0 +0 +0 +3 +0 +0 +1 +done +0\.600", text), text


def test_status_mid_run_combines_status_file_and_job_logs(tmp_path: Path) -> None:
    """Queued nodes are refined by their logs: idle, running, held; the others keep DAGMan's."""
    run = fake_run(tmp_path / "run", rounds=1, nodes=5)
    logs = {
        n: UserLog(node_dir(run, 0, n) / "job.log", 10 + n, f"train_r000_n{n:03d}")
        for n in range(5)
    }
    for n in (1, 3):  # a first try that failed: DAGMan's RETRY submits a new job
        earlier = UserLog(node_dir(run, 0, n) / "job.log", 5 + n, f"train_r000_n{n:03d}")
        earlier.submitted()
        earlier.executing()
        earlier.terminated(75, None)
    for log in logs.values():
        log.submitted()
    logs[1].executing()
    logs[2].executing()
    logs[2].held("disk full", 13, 0)
    logs[3].executing()
    logs[3].terminated(0, None)
    states = [SUBMITTED, SUBMITTED, SUBMITTED, DONE, ERROR]
    # The status file's RetryCount restarts with each DAGMan (rescue): the logs count the tries.
    nodes = [NodeState(f"train_r000_n{n:03d}", s, retry_count=0) for n, s in enumerate(states)]
    nodes.append(NodeState("aggregate_r000", NOT_READY))
    write(run / STATUS_FILE, render(run / DAG_FILE, SUBMITTED, nodes, time.time() + 10))
    (node_dir(run, 0, 4) / "MISSING").write_text("failed 2 times\n")
    status = read_status(run)
    assert status.state == "running" and not status.ended
    counts = status.rounds[0].nodes
    assert (counts["idle"], counts["running"], counts["held"]) == (1, 1, 1)
    assert (counts["done"], counts["failed"], counts["waiting"]) == (1, 1, 0)
    assert status.rounds[0].missing == 1 and status.retries == 2
    assert status.rounds[0].aggregate == "waiting" and status.accuracy == []


def test_node_state_trusts_logs_only_while_the_job_is_active() -> None:
    assert node_state(None, None) == "waiting"
    assert node_state(None, "running") == "running"  # status file not written yet
    assert node_state(NOT_READY, "ended") == "waiting"  # a log of an earlier submission
    assert node_state(SUBMITTED, "ended") == "running"  # POST script pending
    assert node_state(DONE, "held") == "done"
    assert node_state(ERROR, None) == "failed"


def test_a_resubmitted_run_is_not_shown_as_its_previous_dagman_ended(tmp_path: Path) -> None:
    """`dagtrain submit` of a failed or removed run, then `status --watch`: the status file says
    failed until the new DAGMan rewrites it, which must not end the watch."""
    run = fake_run(tmp_path / "run", rounds=1, nodes=2, script='test "$2" != n001', retries=0)
    assert not run_dag(run / DAG_FILE, slots=2).ok
    assert read_status(run).state == "failed"
    status_file = run / STATUS_FILE
    submitted = run / f"{DAG_FILE}.condor.sub"
    submitted.write_text("")
    os.utime(submitted, ns=(status_file.stat().st_mtime_ns + 10**9,) * 2)
    assert not read_status(run).ended
    os.utime(status_file, ns=(submitted.stat().st_mtime_ns + 10**9,) * 2)  # the new DAGMan's
    assert read_status(run).state == "failed"


def test_status_of_a_run_never_started(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run")
    status = read_status(run)
    assert status.state == "not started" and status.rounds[0].nodes["waiting"] == 3
    assert cli.main(["status", str(run)]) == 0
    assert "not started: round 1/2" in capsys.readouterr().out


def test_status_of_no_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["status", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ---------------------------------------------------------------- submit, no pool


@pytest.fixture
def fake_dagman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A condor_dagman on PATH: Submit.from_dag only locates it, and no schedd is running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "condor_dagman").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "condor_dagman").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_throttles_map_to_dagman_arguments(
    tmp_path: Path, fake_dagman: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dag_options(None, None) == {}
    assert dag_options(2, 5) == {"maxjobs": 2, "maxidle": 5}
    run = fake_run(tmp_path / "run")
    monkeypatch.chdir(run)
    htcondor2.Submit.from_dag(DAG_FILE, dag_options(2, 5))
    arguments = (run / f"{DAG_FILE}.condor.sub").read_text()
    assert "-MaxJobs 2" in arguments and "-MaxIdle 5" in arguments


@pytest.mark.parametrize(("maxjobs", "maxidle"), [(0, None), (None, -1)])
def test_throttles_must_be_positive(maxjobs: int | None, maxidle: int | None) -> None:
    with pytest.raises(UserError, match="must be at least 1"):
        dag_options(maxjobs, maxidle)


def test_submit_refuses_an_incomplete_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run")
    (run / "submit/node.sub").unlink()
    assert cli.main(["submit", str(run)]) == 2
    err = capsys.readouterr().err
    assert "incomplete run directory, missing submit/node.sub" in err
    assert err.count("error:") == 1


def test_submit_refuses_a_completed_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    report = {"status": "completed", "rounds_completed": 2, "final_accuracy": 0.6}
    (run / REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(
        UserError, match=r"already completed \(2 rounds, final held-out accuracy 0.6"
    ):
        submit(run)


def test_submit_without_htcondor_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="condor_dagman is not on PATH: install HTCondor"):
        submit(fake_run(tmp_path / "run"))


def test_submit_without_a_schedd(tmp_path: Path, fake_dagman: Path) -> None:
    with pytest.raises(UserError, match="no HTCondor schedd found on this machine"):
        submit(fake_run(tmp_path / "run"))


class _Schedd:
    """Stands in for htcondor2.Schedd: an empty queue; submit records or refuses."""

    refuse: ClassVar[str | None] = None
    submitted: ClassVar[list[tuple[str, Path]]] = []

    def query(self, constraint: str, projection: list[str]) -> list:
        return []

    def submit(self, description: htcondor2.Submit) -> object:
        if self.refuse:
            raise htcondor2.HTCondorException(self.refuse)
        self.submitted.append((description["arguments"], Path.cwd()))
        return type("Result", (), {"cluster": staticmethod(lambda: 41)})()


def test_submit_reopens_missing_nodes_then_submits_from_the_run_dir(
    tmp_path: Path, fake_dagman: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fake_run(tmp_path / "run", rounds=1, nodes=2)
    (run / f"{DAG_FILE}.rescue001").write_text("DONE train_r000_n000\nDONE train_r000_n001\n")
    (node_dir(run, 0, 1) / "MISSING").write_text("failed 2 times\n")
    monkeypatch.setattr(htcondor2, "Schedd", _Schedd)
    monkeypatch.setattr(_Schedd, "submitted", [])
    assert submit(run, maxjobs=3) == 41
    [(arguments, cwd)] = _Schedd.submitted
    assert cwd == run.resolve() and "-MaxJobs 3" in arguments
    assert (run / f"{DAG_FILE}.rescue001").read_text() == "DONE train_r000_n000\n"
    assert not (node_dir(run, 0, 1) / "MISSING").exists()


def test_submit_refused_by_the_schedd(
    tmp_path: Path, fake_dagman: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(htcondor2, "Schedd", _Schedd)
    monkeypatch.setattr(_Schedd, "refuse", "Failed to connect to schedd")
    with pytest.raises(UserError, match=r"the HTCondor schedd refused the DAG of .*: Failed to"):
        submit(fake_run(tmp_path / "run"))


def test_remote_options_need_remote(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["status", str(tmp_path), "--remote-dir", "x"]) == 2
    assert "need --remote USER@HOST" in capsys.readouterr().err


# ---------------------------------------------------------------- on the pool


def _dagtrain(pool: CondorPool, cwd: Path, *args: str, timeout_s: float | None = None):
    timeout_s = timeout_s or wait_s(60, 4)
    return pool.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, timeout_s=timeout_s)


def _job_intervals(run: Path) -> list[tuple[int, int]]:
    """(execute, terminate) times of every node job, from the nodes' job event logs."""
    intervals = []
    for log in sorted(run.glob("rounds/*/**/*.log")):
        started = None
        for event in htcondor2.JobEventLog(str(log)).events(stop_after=0):
            if event.type == htcondor2.JobEventType.EXECUTE:
                started = event.timestamp
            elif event.type == htcondor2.JobEventType.JOB_TERMINATED:
                assert started is not None
                intervals.append((started, event.timestamp))
    return intervals


@pytest.mark.pool
def test_submit_with_maxjobs_runs_one_job_at_a_time(
    condor_pool: CondorPool, condor_workdir: Path
) -> None:
    run = fake_run(condor_workdir / "run", rounds=1, nodes=3, script="sleep 2")
    condor_pool.own(condor_workdir)
    started = time.monotonic()
    proc = _dagtrain(condor_pool, run, "submit", str(run), "--maxjobs", "1", "--maxidle", "2")
    assert proc.returncode == 0, proc.stderr
    cluster = int(proc.stdout.strip())
    assert f"as DAGMan job {cluster}" in proc.stderr
    arguments = (run / f"{DAG_FILE}.condor.sub").read_text()
    assert "-MaxJobs 1" in arguments and "-MaxIdle 2" in arguments

    again = _dagtrain(condor_pool, run, "submit", str(run))
    assert again.returncode == 2
    assert f"already submitted and still running as DAGMan job {cluster}" in again.stderr

    watch = _dagtrain(condor_pool, run, "status", str(run), "--watch", timeout_s=wait_s(120, 10))
    print(f"maxjobs 1 DAG: {time.monotonic() - started:.1f} s")
    assert watch.returncode == 0, watch.stderr
    assert "done: round 1/1, 0 retries, held-out accuracy 0.500; report: completed" in watch.stdout
    intervals = sorted(_job_intervals(run))
    assert len(intervals) == 4  # 3 nodes + the aggregation
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(intervals)), intervals

    finished = _dagtrain(condor_pool, run, "submit", str(run))
    assert finished.returncode == 2 and "this run already completed" in finished.stderr


@pytest.mark.pool
def test_status_of_a_failed_pool_run(condor_pool: CondorPool, condor_workdir: Path) -> None:
    """Node 0 always fails: retried once, then the round's aggregation never runs."""
    run = fake_run(condor_workdir / "run", rounds=2, nodes=2, script='test "$2" != n000', retries=1)
    condor_pool.own(condor_workdir)
    proc = _dagtrain(condor_pool, run, "submit", str(run))
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + wait_s(90, 8)
    while not (status := read_status(run)).ended:
        assert time.monotonic() < deadline, _text(status)
        time.sleep(1)
    assert status.state == "failed" and status.report_status == "failed"
    assert status.rounds[0].nodes["failed"] == 1 and status.rounds[0].nodes["done"] == 1
    assert status.rounds[0].retries == 1
    assert status.rounds[0].aggregate == "waiting"  # futile: its parent failed
    assert status.rounds[1].nodes["waiting"] == 2
    shown = _dagtrain(condor_pool, run, "status", str(run))
    assert shown.returncode == 1 and "failed: round 1/2, 1 retries" in shown.stdout


@pytest.mark.pool
def test_submit_names_the_setting_a_version_mismatch_needs(
    condor_pool: CondorPool, condor_workdir: Path
) -> None:
    """These bindings are newer than the pool's 23.9 schedd: with channel binding enforced (the
    bindings' default), FS authentication fails, and the message says what to set."""
    run = fake_run(condor_workdir / "run", rounds=1, nodes=1)
    condor_pool.own(condor_workdir)
    enforce = "_CONDOR_SEC_FS_ENFORCE_CHANNEL_BINDING=True"
    proc = condor_pool.run(
        ["env", enforce, sys.executable, "-m", "pipeline.cli", "submit", str(run)],
        cwd=run,
        timeout_s=wait_s(60, 4),
    )
    assert proc.returncode == 2, proc.stderr
    assert "SEC_FS_ENFORCE_CHANNEL_BINDING = False" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1


# Round 0's node jobs finish at once; round 1's wait for the file `go` in the run directory.
HOLD_IN_ROUND_1 = (
    '[ "$(basename "$(dirname "$(pwd)")")" = r000 ] || '
    "while [ ! -e ../../../go ]; do sleep 0.1; done"
)


def _queue(pool: CondorPool, cwd: Path) -> list[str]:
    """The clusters of every job in the schedd's queue."""
    proc = pool.run(["condor_q", "-allusers", "-af", "ClusterId"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.pool
@pytest.mark.slow
def test_rm_removes_the_dagman_job_and_submit_resumes_the_run(
    condor_pool: CondorPool, condor_workdir: Path
) -> None:
    run = fake_run(condor_workdir / "run", rounds=2, nodes=2, script=HOLD_IN_ROUND_1)
    condor_pool.own(condor_workdir)
    proc = _dagtrain(condor_pool, run, "submit", str(run))
    assert proc.returncode == 0, proc.stderr
    cluster = proc.stdout.strip()
    deadline = time.monotonic() + wait_s(90, 8)
    while read_status(run).rounds[1].nodes["running"] < 2:
        assert time.monotonic() < deadline, _text(read_status(run))
        time.sleep(0.5)
    assert cluster in _queue(condor_pool, run)

    removed = _dagtrain(condor_pool, run, "rm", str(run))
    assert removed.returncode == 0, removed.stderr
    assert f"removed DAGMan job {cluster}" in removed.stderr
    deadline = time.monotonic() + wait_s(60, 4)
    while queue := _queue(condor_pool, run):  # DAGMan, its node jobs and its FINAL node leave
        assert time.monotonic() < deadline, queue
        time.sleep(0.5)
    assert (run / f"{DAG_FILE}.rescue001").is_file()
    again = _dagtrain(condor_pool, run, "rm", str(run))
    assert again.returncode == 2 and "nothing to stop" in again.stderr

    (run / "go").touch()
    assert _dagtrain(condor_pool, run, "submit", str(run)).returncode == 0
    watch = _dagtrain(condor_pool, run, "status", str(run), "--watch", timeout_s=wait_s(120, 10))
    assert watch.returncode == 0, watch.stderr
    assert "done: round 2/2" in watch.stdout and "report: completed" in watch.stdout
    # The rescue DAG kept round 0: its node jobs ran once, before the removal.
    for node in range(2):
        log = (node_dir(run, 0, node) / "job.log").read_text()
        assert len(re.findall(r"^001 ", log, re.MULTILINE)) == 1
