"""A run's life around `dagtrain run`: one runner per run directory, a completed run reused or
redone with --force, Ctrl-C, `dagtrain rm` and SIGKILL leaving a resumable run and no orphaned
jobs.

Most runs here are shell-script DAGs laid out as the planner's (tests/test_submit_status.py's
fake_run), so they take seconds; the one real tiny run is marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_submit_status import fake_run

from node_payload.common.errors import UserError
from node_payload.common.run_layout import REPORT_FILE, node_dir
from pipeline import cli
from pipeline.run_lock import LOCK_FILE, RunLock, process_identity
from pipeline.run_status import STOPPED, read_status

# The FINAL node of these runs: report.json with the keys `dagtrain run` prints.
REPORT_SH = """n=$(ls rounds/*/round.json 2>/dev/null | wc -l)
[ "$1" = 0 ] && s=completed || s=failed
printf '{"status": "%s", "summary": "%s/%s rounds", "rounds_completed": %s, "final_accuracy": 0.6}\\n' "$s" "$n" "$2" "$n" > report.json
[ "$1" = 0 ]
"""
# Each node job records its PID (job.pid appears whole: the tests read it once it exists),
# counts its run, and with `hold`, waits for the file `go`.
NODE_SH = 'echo $$ > job.tmp; mv job.tmp job.pid; echo "$2" >> ../../../runs.txt; {extra}'
HOLD = "while [ ! -e ../../../go ]; do sleep 0.05; done"
HOLDER = """
import sys
from pathlib import Path
from pipeline.run_lock import RunLock
with RunLock(Path(sys.argv[1]), "run"):
    print("held", flush=True)
    sys.stdin.read()
"""


def make_run(run_dir: Path, rounds: int = 2, nodes: int = 2, extra: str = "true") -> Path:
    """A fake run whose config has the keys the runner reads, and a report like the real one's."""
    fake_run(run_dir, rounds=rounds, nodes=nodes, script=NODE_SH.format(extra=extra), retries=0)
    (run_dir / "config.toml").write_text(
        f'[run]\nname = "fake"\nnodes = {nodes}\nrounds = {rounds}\nmode = "sync"\n'
        'run_id = "fake"\n[data]\n[model]\n[train]\n[server]\n[compression]\nmethod = "none"\n'
    )
    (run_dir / "scripts/report.sh").write_text("#!/bin/sh\n" + REPORT_SH)
    sub = run_dir / "submit/report.sub"
    sub.write_text(sub.read_text().replace("$(DAG_STATUS)", f"$(DAG_STATUS) {rounds}"))
    (run_dir / "models").mkdir()
    return run_dir


def runs(run_dir: Path) -> list[str]:
    path = run_dir / "runs.txt"
    return path.read_text().split() if path.exists() else []


def job_pids(run_dir: Path, round_: int, nodes: int) -> list[int]:
    return [int((node_dir(run_dir, round_, n) / "job.pid").read_text()) for n in range(nodes)]


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper that this container may not have."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(done: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {deadline_s:.1f} s"
        time.sleep(0.02)


def start_runner(run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(run_dir), "--slots", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def run_seconds(tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long a whole `dagtrain run` of a small fake run takes here, in its own process: the
    unit every deadline below is scaled from (a loaded machine gets longer deadlines)."""
    run_dir = make_run(tmp_path_factory.mktemp("baseline") / "run")
    started = time.monotonic()
    proc = start_runner(run_dir)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return time.monotonic() - started


@pytest.fixture
def held_run(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Makes runs whose node jobs wait for `go`, which teardown creates: a failed test leaves no
    job waiting forever."""
    made: list[Path] = []

    def make(rounds: int) -> Path:
        made.append(make_run(tmp_path / f"run{len(made)}", rounds=rounds, extra=HOLD))
        return made[-1]

    yield make
    for run_dir in made:
        (run_dir / "go").touch()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Starts processes holding a run's lock (until their stdin closes)."""
    procs: list[subprocess.Popen[str]] = []

    def start(run_dir: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(run_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- one runner per run directory


def test_a_second_runner_is_refused_naming_the_holder(
    tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]], capsys: pytest.CaptureFixture
) -> None:
    run_dir = make_run(tmp_path / "run")
    proc = holder(run_dir)
    record = json.loads((run_dir / LOCK_FILE).read_text())
    assert record["pid"] == proc.pid and record["command"] == "run"
    for command in ("run", "submit"):
        assert cli.main([command, str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "already in use by `dagtrain run`" in err
        assert f"PID {proc.pid}" in err and record["started"] in err
    assert runs(run_dir) == []  # nothing ran
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait() == 0
    assert (run_dir / LOCK_FILE).read_text() == ""  # released cleanly: no record left


def test_a_stale_lock_is_taken_over(
    tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]], capsys: pytest.CaptureFixture
) -> None:
    run_dir = make_run(tmp_path / "run", rounds=1)
    dead = holder(run_dir)
    dead.kill()  # the kernel drops its flock; its record stays
    dead.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == dead.pid
    assert cli.main(["run", str(run_dir)]) == 0
    assert f"taking over from `dagtrain run` (PID {dead.pid}" in capsys.readouterr().err
    assert sorted(runs(run_dir)) == ["n000", "n001"]  # two slots: either may start first


def test_the_recorded_pid_decides_when_the_flock_is_free(tmp_path: Path) -> None:
    """A live recorded holder means a file system without flock: refused. A recorded PID now
    used by another process (its start time differs) is stale: taken over."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier", "command": "run"}
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps(me | {"identity": process_identity(os.getpid())}))
    with pytest.raises(UserError, match=rf"PID {os.getpid()} on .*started earlier"):
        RunLock(tmp_path, "run").__enter__()
    lock.write_text(json.dumps(me | {"identity": "another boot:0"}))
    with RunLock(tmp_path, "run") as taken:
        assert taken.stale is not None and taken.stale.pid == os.getpid()
    assert lock.read_text() == ""


# ---------------------------------------------------------------- completed runs


def test_a_completed_run_is_reused_and_force_redoes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Node n001 fails until `fixed` exists: the first run fails, the second resumes.
    run_dir = make_run(tmp_path / "run", extra='test -e ../../../fixed || test "$2" != n001')
    assert cli.main(["run", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "failed: 0/2 rounds" in err and "None" not in err
    assert f"resume with: dagtrain run {run_dir}" in err
    (run_dir / "fixed").touch()
    started = time.monotonic()
    assert cli.main(["run", str(run_dir)]) == 0
    run_s = time.monotonic() - started
    assert "completed: 2/2 rounds, final held-out accuracy 0.600" in capsys.readouterr().err
    assert (run_dir / "dagtrain.dag.rescue001").is_file()
    logs = sorted(run_dir.glob("rounds/**/*.log"))
    before = {log: log.stat().st_mtime_ns for log in logs}
    ran = runs(run_dir)

    started = time.monotonic()
    assert cli.main(["run", str(run_dir)]) == 0
    reuse_s = time.monotonic() - started
    assert "already completed: 2/2 rounds" in capsys.readouterr().err
    assert runs(run_dir) == ran and {log: log.stat().st_mtime_ns for log in logs} == before
    assert not (run_dir / ".local_runner/dagtrain.dag.journal").exists()
    assert reuse_s < run_s / 2

    assert cli.main(["run", str(run_dir), "--force"]) == 0
    assert "completed: 2/2 rounds" in capsys.readouterr().err
    assert sorted(runs(run_dir)[len(ran) :]) == ["n000", "n000", "n001", "n001"]  # all again
    assert not (run_dir / "dagtrain.dag.rescue001").exists()
    assert json.loads((run_dir / REPORT_FILE).read_text())["status"] == "completed"


def test_demo_reuses_its_completed_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    (out / "data/textures").mkdir(parents=True)  # generated before: not made again
    (out / "demo.toml").write_text("# planned before\n")
    run_dir = make_run(out / "run", rounds=1)
    assert cli.main(["run", str(run_dir)]) == 0
    ran = runs(run_dir)
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert "already completed: 1/1 rounds" in capsys.readouterr().err
    assert runs(run_dir) == ran


# ---------------------------------------------------------------- interrupts


def _running_round(
    held_run: Callable[[int], Path], run_seconds: float
) -> tuple[Path, subprocess.Popen[str], list[int]]:
    """A runner started on a two-round run, once both of round 0's node jobs are running."""
    run_dir = held_run(2)
    proc = start_runner(run_dir)
    pid_files = [node_dir(run_dir, 0, n) / "job.pid" for n in range(2)]
    wait_until(lambda: all(p.exists() for p in pid_files), 10 * run_seconds, "jobs started")
    return run_dir, proc, job_pids(run_dir, 0, 2)


def test_ctrl_c_stops_cleanly_and_the_run_resumes(
    held_run: Callable[[int], Path], run_seconds: float, capsys: pytest.CaptureFixture
) -> None:
    run_dir, proc, pids = _running_round(held_run, run_seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10 * run_seconds)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.count("resume with:") == 1
    assert f"stopped by SIGINT; resume with: dagtrain run {run_dir}" in err
    assert not any(alive(pid) for pid in pids)

    status = read_status(run_dir)
    assert status.state == STOPPED and status.ended
    assert status.rounds[0].nodes["waiting"] == 2
    assert cli.main(["status", str(run_dir)]) == 0
    assert "stopped (resumable): round 1/2" in capsys.readouterr().out

    (run_dir / "go").touch()
    assert cli.main(["run", str(run_dir)]) == 0
    assert read_status(run_dir).state == "done"
    assert sorted(runs(run_dir)) == ["n000", "n000", "n000", "n001", "n001", "n001"]


def test_rm_stops_a_local_run_which_resumes(
    held_run: Callable[[int], Path], run_seconds: float, capsys: pytest.CaptureFixture
) -> None:
    run_dir, proc, pids = _running_round(held_run, run_seconds)
    assert cli.main(["rm", str(run_dir)]) == 0  # returns once the runner released the run
    assert f"stopped `dagtrain run` (PID {proc.pid} on" in capsys.readouterr().err
    _, err = proc.communicate(timeout=10 * run_seconds)
    assert proc.returncode == 143, err
    assert f"stopped by SIGTERM; resume with: dagtrain run {run_dir}" in err
    assert not any(alive(pid) for pid in pids)
    assert read_status(run_dir).state == STOPPED

    assert cli.main(["stop", str(run_dir)]) == 2  # nothing runs it any more
    assert "no `dagtrain run` runs it" in capsys.readouterr().err
    (run_dir / "go").touch()
    assert cli.main(["run", str(run_dir)]) == 0
    assert sorted(runs(run_dir)) == ["n000", "n000", "n000", "n001", "n001", "n001"]


def test_killed_runner_takes_its_jobs_along_and_resume_cleans_up(
    held_run: Callable[[int], Path], run_seconds: float, capsys: pytest.CaptureFixture
) -> None:
    run_dir = held_run(1)
    proc = start_runner(run_dir)
    pid_files = [node_dir(run_dir, 0, n) / "job.pid" for n in range(2)]
    wait_until(lambda: all(p.exists() for p in pid_files), 10 * run_seconds, "jobs started")
    pids = job_pids(run_dir, 0, 2)
    sandboxes = list((run_dir / ".local_runner/sandbox").iterdir())
    assert len(sandboxes) == 2
    proc.kill()
    proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), 10 * run_seconds, "jobs died")
    assert all(s.exists() for s in sandboxes)  # left behind by the killed runner
    assert read_status(run_dir).state == STOPPED

    (run_dir / "go").touch()
    assert cli.main(["run", str(run_dir)]) == 0
    assert f"(PID {proc.pid} on" in capsys.readouterr().err  # its stale lock, taken over
    assert not any(s.exists() for s in sandboxes)
    assert sorted(runs(run_dir)) == ["n000", "n000", "n001", "n001"]


@pytest.mark.slow
def test_ctrl_c_on_a_real_run_resumes_to_the_same_report(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    assert cli.main(["plan", str(tiny_config()), "--out", str(run_dir)]) == 0
    journal = run_dir / ".local_runner/dagtrain.dag.journal"
    started = time.monotonic()
    proc = start_runner(run_dir)
    wait_until(lambda: journal.is_file() and journal.read_text(), 600, "a node job finished")
    node_s = time.monotonic() - started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10 * node_s)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert read_status(run_dir).state == STOPPED
    finished = journal.read_text().split()[1]  # "DONE train_r000_nNNN"
    update = node_dir(run_dir, 0, int(finished[-3:])) / "update.safetensors"
    kept = update.stat().st_mtime_ns
    assert cli.main(["run", str(run_dir)]) == 0
    assert json.loads((run_dir / REPORT_FILE).read_text())["status"] == "completed"
    assert update.stat().st_mtime_ns == kept  # the finished node did not run again
