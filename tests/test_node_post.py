"""The node POST script: DAGMan retries a failed node, then the node counts as missing.

The script runs, as under DAGMan, from a run directory holding the job payload, and execs the
payload's torch-free `post` command with the submit host's Python.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from node_payload.common.errors import EXIT_FATAL
from node_payload.common.run_layout import NODE_POST_SCRIPT, PAYLOAD_DIR, node_dir
from pipeline.payload_zip import write_payload
from pipeline.render import render


@pytest.fixture
def post_script(tmp_path: Path) -> Path:
    """scripts/node_post.sh in a run directory (tmp_path) with its payload."""
    (tmp_path / PAYLOAD_DIR).mkdir()
    write_payload(tmp_path / PAYLOAD_DIR)
    script = tmp_path / NODE_POST_SCRIPT
    script.parent.mkdir()
    script.write_text(render("node_post.sh.j2", fatal_exit=EXIT_FATAL, python=sys.executable))
    script.chmod(0o755)
    return script


def _run(script: Path, *args: object) -> subprocess.CompletedProcess:
    """The script as DAGMan runs it: from the run directory."""
    command = [str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, cwd=script.parent.parent, text=True)


def _post(script: Path, node: int, ret: int, retry: int, max_retries: int = 2) -> int:
    """The POST script of round 0's node job `node`, as DAGMan runs it ($JOB is its name)."""
    node_dir(script.parent.parent, 0, node).mkdir(parents=True, exist_ok=True)
    return _run(script, ret, retry, max_retries, f"train_r000_n{node:03d}").returncode


@pytest.mark.parametrize(
    ("ret", "retry", "expected", "missing"),
    [
        (0, 0, 0, False),  # success
        (75, 0, 75, False),  # retryable failure, tries left: DAGMan retries
        (1, 1, 1, False),
        (75, 2, 0, True),  # last try failed: counts as missing, the DAG goes on
        (EXIT_FATAL, 0, EXIT_FATAL, False),  # bad config: fail the node (no retry: UNLESS-EXIT)
        (-1002, 0, 0, True),  # removed at the deadline: missing at once, no retry
        (-1001, 0, 0, True),  # never submitted
        (-9, 0, 1, False),  # killed by a signal (the volunteer's machine): retried
        (-9, 2, 0, True),  # ... until the last try
    ],
)
def test_post_script_decisions(
    post_script: Path, tmp_path: Path, ret: int, retry: int, expected: int, missing: bool
) -> None:
    assert _post(post_script, 0, ret, retry) == expected
    assert (node_dir(tmp_path, 0, 0) / "MISSING").exists() == missing


def test_missing_marks_say_what_happened(post_script: Path, tmp_path: Path) -> None:
    _post(post_script, 1, -9, 2)
    assert (tmp_path / "rounds/r000/n001/MISSING").read_text() == (
        "failed 3 times, last killed by signal 9\n"
    )
    _post(post_script, 2, 75, 2)
    assert (tmp_path / "rounds/r000/n002/MISSING").read_text() == (
        "failed 3 times, last exit code 75\n"
    )


def test_success_after_a_missing_mark_clears_it(post_script: Path, tmp_path: Path) -> None:
    _post(post_script, 1, 75, 2)
    assert (node_dir(tmp_path, 0, 1) / "MISSING").exists()
    _post(post_script, 1, 0, 0)
    assert not (node_dir(tmp_path, 0, 1) / "MISSING").exists()


def test_a_fatal_job_is_named_with_its_error_log(post_script: Path, tmp_path: Path) -> None:
    node_dir(tmp_path, 0, 2).mkdir(parents=True)
    done = _run(post_script, EXIT_FATAL, 0, 2, "train_r000_n002")
    assert done.returncode == EXIT_FATAL
    assert done.stderr == "fatal error, see rounds/r000/n002/job.err\n"


@pytest.mark.parametrize(("ret", "expected"), [(0, 0), (75, 75), (EXIT_FATAL, EXIT_FATAL), (-9, 1)])
def test_an_aggregation_node_is_decided_by_its_job_alone(
    post_script: Path, tmp_path: Path, ret: int, expected: int
) -> None:
    """The DAG gives every node the POST script (ALL_NODES): an aggregation's last try that
    failed still fails its node (no MISSING mark), and a fatal one stops its retries."""
    done = _run(post_script, ret, 2, 2, "aggregate_r000")
    assert done.returncode == expected and not list(tmp_path.rglob("MISSING"))


def test_the_post_script_imports_no_torch(post_script: Path, tmp_path: Path) -> None:
    """It runs after every node job: it must start in milliseconds, not load torch."""
    node_dir(tmp_path, 0, 0).mkdir(parents=True)
    payload = tmp_path / PAYLOAD_DIR / "dagtrain.pyz"
    command = [sys.executable, "-X", "importtime", str(payload), "post", "75", "2", "2"]
    command.append("train_r000_n000")
    done = subprocess.run(command, capture_output=True, cwd=tmp_path, text=True)
    assert done.returncode == 0 and (node_dir(tmp_path, 0, 0) / "MISSING").is_file()
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "aggregation.node_post" in imported
    assert not [name for name in imported if re.match(r"(torch|numpy|safetensors)\b", name)]
