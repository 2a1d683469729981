"""Golden run directories: the DAG, submit files and scripts of a small run in each mode, as a
user reads them, checked in under tests/golden/ and reviewed like code.

A change to what the planner writes shows here as a diff. When it is meant, refresh the files
and review the diff with the change:

    DAGTRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_dag_golden.py
"""

import os
import shutil
from pathlib import Path

import pytest

from node_payload.common.run_layout import DAG_FILE, NODE_SUBMIT, SCRIPTS_DIR
from pipeline.planner import plan_from_file

GOLDEN = Path(__file__).parent / "golden"
# Every value that would differ between machines or plans is fixed: the run id, the
# interpreters (otherwise this machine's), the seed.
CONFIG = """\
[run]
name = "golden"
mode = "{mode}"
nodes = 2
rounds = 2
seed = 7
run_id = "0123456789abcdef"
[data]
dataset = "{dataset}"
local_train = 48
local_test = 16
heldout_test = 64
[model]
arch = "smallcnn"
[execution]
python = "/usr/bin/python3"
submit_python = "/usr/bin/python3"
"""


def _user_files(run_dir: Path) -> dict[str, str]:
    """The text files a user reads: the DAG, the submit files and the scripts."""
    paths = [
        run_dir / DAG_FILE,
        *(run_dir / NODE_SUBMIT).parent.iterdir(),
        *(run_dir / SCRIPTS_DIR).iterdir(),
    ]
    return {path.relative_to(run_dir).as_posix(): path.read_text() for path in sorted(paths)}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_planned_files_match_the_golden_run(tiny_dataset: Path, tmp_path: Path, mode: str) -> None:
    config = tmp_path / "golden.toml"
    config.write_text(CONFIG.format(mode=mode, dataset=tiny_dataset))
    planned = _user_files(plan_from_file(config, tmp_path / "run"))
    golden = GOLDEN / mode
    if os.environ.get("DAGTRAIN_UPDATE_GOLDEN") == "1":
        shutil.rmtree(golden, ignore_errors=True)
        for relative, text in planned.items():
            (golden / relative).parent.mkdir(parents=True, exist_ok=True)
            (golden / relative).write_text(text)
    assert sorted(planned) == sorted(_user_files(golden)), "files added or gone"
    for relative, text in planned.items():
        assert text == (golden / relative).read_text(), (
            f"{relative} differs from tests/golden/{mode}/{relative}; if meant, refresh with "
            "DAGTRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_dag_golden.py"
        )
