"""Warm interpreters: a payload job forked from a server with torch imported is the same job.

Each test's jobs are `python dagtrain.pyz ...` with a small payload of its own, so what the job
saw (argv, working directory, environment, streams, threads, exit status) can be compared with
what a fresh process sees, and the server or the job can be killed on purpose.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from test_local_runner_helpers import dag, job
from timing import wait_s

from node_payload.common.run_layout import MODELS_DIR, ROUNDS_DIR, UPDATE_FILE
from pipeline.cli import main
from pipeline.local_runner import REMOVED_RETURN, NodeEvent, run_dag

PYTHON = sys.executable
WARM = [PYTHON]

# The job's payload: `dagtrain.pyz ACTION ...`, standard library and torch only.
PAYLOAD_MAIN = """
import json, os, signal, sys, time

action, out = sys.argv[1], sys.argv[2]
if action == "describe":
    import torch
    seen = {
        "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "env": dict(os.environ),
        "stdin": sys.stdin.read(), "threads": torch.get_num_threads(),
        "own_group": os.getpgid(0) == os.getpid(), "main": __name__, "parent": os.getppid(),
        "dagtrain": sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "tests")),
    }
    with open(out, "w") as f:
        json.dump(seen, f)
    print("to stdout")
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[3]))
with open(out, "a") as f:
    print(os.getpid(), os.getppid(), file=f)
if action == "kill-server" and sys.argv[3] == "0":
    os.kill(os.getppid(), signal.SIGKILL)
if action in ("kill-server", "wait"):
    while not os.path.exists(out + ".go"):
        time.sleep(0.05)
"""


def payload(directory: Path) -> None:
    with zipfile.ZipFile(directory / "dagtrain.pyz", "w") as archive:
        archive.writestr("__main__.py", PAYLOAD_MAIN)


def python_job(directory: Path, name: str, arguments: str, submit: str = "") -> None:
    """A vanilla job running the payload with this Python, its payload transferred."""
    (directory / f"{name}.sub").write_text(
        f"universe = vanilla\nexecutable = {PYTHON}\ntransfer_executable = false\n"
        f'arguments = "dagtrain.pyz {arguments}"\nshould_transfer_files = YES\n'
        "transfer_input_files = dagtrain.pyz\nrequest_cpus = 1\n"
        f"log = {name}.log\noutput = {name}.out\nerror = {name}.err\n{submit}\nqueue\n"
    )


def jobs(pids: Path) -> list[tuple[int, int]]:
    """(pid, parent pid) of each job the payload started, as it wrote them."""
    lines = [line.split() for line in pids.read_text().splitlines()]
    return [(int(pid), int(parent)) for pid, parent in lines]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] != "Z"


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)


def _describe(directory: Path, warm: bool) -> dict[str, dict]:
    """What each job saw: V (vanilla), L (local universe), P (sets PYTHONDONTWRITEBYTECODE,
    which a Python reads as it starts: never warm) and S (a script: never warm)."""
    directory.mkdir()
    payload(directory)
    python_job(directory, "V", f"describe {directory}/V.json 3")
    python_job(directory, "P", f"describe {directory}/P.json 0",
               submit='environment = "PYTHONDONTWRITEBYTECODE=1"')  # fmt: skip
    (directory / "L.sub").write_text(
        f"universe = local\nexecutable = {PYTHON}\n"
        f'arguments = "dagtrain.pyz describe {directory}/L.json 0"\n'
        "log = L.log\noutput = L.out\nerror = L.err\nqueue\n"
    )
    job(directory, "S", f"echo $PPID > {directory}/S.txt")
    text = "JOB V V.sub\nJOB L L.sub\nJOB P P.sub\nJOB S S.sub\n"
    result = run_dag(dag(directory, text), slots=2, warm_pythons=WARM if warm else ())
    assert result.failed == ["V"] and sorted(result.done) == ["L", "P", "S"]
    assert (directory / "V.out").read_text() == "to stdout\n"
    assert (directory / "V.err").read_text() == "to stderr\n"
    assert "return value 3" in (directory / "V.log").read_text()
    seen = {n: json.loads((directory / f"{n}.json").read_text()) for n in "VLP"}
    seen["S"] = {"parent": int((directory / "S.txt").read_text())}
    text = json.dumps(seen).replace(str(directory), "RUN")
    return json.loads(re.sub(r"sandbox/(\w+)\.\d+", r"sandbox/\1.N", text))  # any cluster id


def test_a_warm_job_sees_what_a_fresh_process_sees(tmp_path: Path) -> None:
    warm = _describe(tmp_path / "warm", warm=True)
    cold = _describe(tmp_path / "cold", warm=False)
    runner = os.getpid()
    assert [warm[n].pop("parent") == runner for n in "VLPS"] == [False, False, True, True]
    assert [cold[n].pop("parent") == runner for n in "VLPS"] == [True, True, True, True]
    assert warm == cold
    v = warm["V"]
    assert (
        v["argv"][0] == "dagtrain.pyz"
        and v["path0"] == "RUN/.local_runner/sandbox/V.N/dagtrain.pyz"
    )
    assert v["threads"] == 1 and v["own_group"] and v["main"] == "__main__"
    assert v["dagtrain"] == [] and v["stdin"] == ""


def test_a_dead_warm_server_fails_only_its_job_and_retry_runs_it(tmp_path: Path) -> None:
    """The first attempt kills the server running it: that attempt dies of SIGKILL, RETRY runs
    it again in a new server, and the other node, started after, is untouched."""
    payload(tmp_path)
    pids = tmp_path / "pids"
    python_job(tmp_path, "A", f"kill-server {pids} $(retry)")
    python_job(tmp_path, "B", f"quick {tmp_path}/b")
    (tmp_path / f"{pids}.go").touch()
    events: list[NodeEvent] = []
    text = 'JOB A A.sub\nVARS A retry="$(RETRY)"\nRETRY A 1\nJOB B B.sub\nPARENT A CHILD B\n'
    path = dag(tmp_path, text)
    result = run_dag(path, slots=2, on_event=events.append, warm_pythons=WARM)
    assert result.ok and result.done == ["A", "B"]
    assert [(e.kind, e.exit_code) for e in events if e.kind == "retry"] == [("retry", -9)]
    assert "Abnormal termination (signal 9)" in (tmp_path / "A.log").read_text()
    servers = [server for _, server in jobs(pids)]  # a new server for the retry
    assert len(set(servers)) == 2 and os.getpid() not in servers


def test_periodic_remove_kills_a_warm_job(tmp_path: Path) -> None:
    payload(tmp_path)
    pids = tmp_path / "pids"
    python_job(tmp_path, "A", f"wait {pids}",
               submit="periodic_remove = JobStatus == 2 && time() - JobCurrentStartDate >= 1")  # fmt: skip
    (tmp_path / "post.sh").write_text(f"#!/bin/sh\necho $1 > {tmp_path}/post.txt\n")
    (tmp_path / "post.sh").chmod(0o755)
    path = dag(tmp_path, "JOB A A.sub\nSCRIPT POST A post.sh $RETURN\n")
    result = run_dag(path, slots=1, warm_pythons=WARM)
    assert result.ok and (tmp_path / "post.txt").read_text().strip() == str(REMOVED_RETURN)
    [(job_pid, server_pid)] = jobs(pids)
    assert server_pid != os.getpid() and not alive(job_pid)


RUNNER = """
import sys
from pipeline.local_runner import run_dag
run_dag(sys.argv[1], slots=1, warm_pythons=[sys.executable])
"""


def test_a_killed_runner_takes_the_server_and_its_jobs_along(tmp_path: Path) -> None:
    payload(tmp_path)
    pids = tmp_path / "pids"
    python_job(tmp_path, "A", f"wait {pids}")
    path = dag(tmp_path, "JOB A A.sub\n")
    runner = subprocess.Popen([PYTHON, "-c", RUNNER, str(path)])
    wait_until(lambda: pids.exists() and jobs(pids), wait_s(30, 3), "the job started")
    [(job_pid, server_pid)] = jobs(pids)
    assert server_pid != runner.pid
    runner.kill()
    runner.wait()
    wait_until(lambda: not alive(job_pid) and not alive(server_pid), 10, "server and job died")


@pytest.mark.slow
def test_warm_and_cold_runs_write_the_same_bytes(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config()
    runs = {"warm": tmp_path / "warm", "cold": tmp_path / "cold"}
    for name, run_dir in runs.items():
        assert main(["plan", str(config), "--out", str(run_dir)]) == 0
        assert main(["run", str(run_dir), *(["--cold"] if name == "cold" else [])]) == 0
    assert (runs["warm"] / ".local_runner/warm_server.err").exists()
    assert not (runs["cold"] / ".local_runner/warm_server.err").exists()

    def outputs(run_dir: Path) -> dict[str, bytes]:
        files = [*(run_dir / MODELS_DIR).glob("*.safetensors")]
        files += (run_dir / ROUNDS_DIR).glob(f"*/*/{UPDATE_FILE}")
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}

    warm, cold = outputs(runs["warm"]), outputs(runs["cold"])
    assert len(warm) > 4 and warm.keys() == cold.keys()
    assert [name for name in warm if warm[name] != cold[name]] == []
