"""The payload's one table of job commands: every command runs from the built payload."""

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aggregation.job_commands import COMMANDS
from pipeline.payload_zip import build_payload


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "dagtrain.pyz"
    path.write_bytes(build_payload())
    return path


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_from_the_payload(payload: Path, command: str) -> None:
    done = subprocess.run(
        [sys.executable, str(payload), command, "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_an_unknown_command_lists_the_table(payload: Path) -> None:
    done = subprocess.run([sys.executable, str(payload), "train"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "|".join(COMMANDS) in done.stderr


def test_the_payload_holds_the_kernel_and_is_the_same_bytes_each_build() -> None:
    built = build_payload()
    assert built == build_payload()
    with zipfile.ZipFile(io.BytesIO(built)) as z:
        names = set(z.namelist())
    assert {
        "__main__.py",
        "aggregation/job_commands.py",
        "node_payload/common/run_config.py",
    } <= names
