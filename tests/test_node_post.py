"""The node POST script: DAGMan retries a failed node, then the node counts as missing."""

import subprocess
from pathlib import Path

import pytest

from node_payload.common.errors import EXIT_FATAL
from pipeline.render import render


@pytest.fixture
def post_script(tmp_path: Path) -> Path:
    script = tmp_path / "node_post.sh"
    script.write_text(render("node_post.sh.j2", fatal_exit=EXIT_FATAL))
    script.chmod(0o755)
    return script


def _post(script: Path, node_dir: Path, ret: int, retry: int, max_retries: int = 2) -> int:
    node_dir.mkdir(exist_ok=True)
    args = [str(script), str(ret), str(retry), str(max_retries), str(node_dir)]
    return subprocess.run(args, capture_output=True).returncode


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
    node_dir = tmp_path / "n000"
    assert _post(post_script, node_dir, ret, retry) == expected
    assert (node_dir / "MISSING").exists() == missing


def test_missing_marks_say_what_happened(post_script: Path, tmp_path: Path) -> None:
    _post(post_script, tmp_path / "a", -9, 2)
    assert (tmp_path / "a/MISSING").read_text() == "failed 3 times, last killed by signal 9\n"
    _post(post_script, tmp_path / "b", 75, 2)
    assert (tmp_path / "b/MISSING").read_text() == "failed 3 times, last exit code 75\n"


def test_success_after_a_missing_mark_clears_it(post_script: Path, tmp_path: Path) -> None:
    node_dir = tmp_path / "n001"
    _post(post_script, node_dir, 75, 2)
    assert (node_dir / "MISSING").exists()
    _post(post_script, node_dir, 0, 0)
    assert not (node_dir / "MISSING").exists()


def test_a_successful_job_hands_its_residual_to_its_lane(post_script: Path, tmp_path: Path) -> None:
    node_dir, lane_dir = tmp_path / "n000", tmp_path / "l000"
    node_dir.mkdir()
    lane_dir.mkdir()
    (lane_dir / "residual.safetensors").write_bytes(b"round 0")
    (node_dir / "residual.safetensors").write_bytes(b"round 1")
    args = [str(post_script), "75", "2", "2", str(node_dir), str(lane_dir)]
    assert subprocess.run(args).returncode == 0  # a failed job's residual is not the lane's
    assert (lane_dir / "residual.safetensors").read_bytes() == b"round 0"
    args[1:3] = ["0", "0"]
    assert subprocess.run(args).returncode == 0
    assert (lane_dir / "residual.safetensors").read_bytes() == b"round 1"
    assert not (node_dir / "residual.safetensors").exists()
