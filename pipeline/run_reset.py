"""`dagtrain run --force`: a run directory back to the state `dagtrain plan` left it in.

A run resumes from whatever says a node is done: the runner's journal, rescue DAGs, and the
outputs the next jobs read (models, round metrics, an asynchronous run's ledger).
Redoing a run therefore clears all of them, not just report.json; the planned files (DAG, submit
files, config, payload, held-out set, the initial model) and the dataset, which lives outside the
run directory, stay as they are.
"""

import re
import shutil
from pathlib import Path

from aggregation.async_state import Ledger, write_ledger
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    CONFUSION_PLOT_FILE,
    DAG_FILE,
    PLOT_FILE,
    REPORT_FILE,
    STATUS_FILE,
    TENSORBOARD_DIR,
)
from pipeline.local_runner.journal import rescue_files

# The FINAL node's files and the runner's own state (journal, sandboxes, cluster counter).
RUN_OUTPUTS = (
    REPORT_FILE,
    PLOT_FILE,
    CONFUSION_PLOT_FILE,
    "report.log",
    "report.out",
    "report.err",
    STATUS_FILE,
)
RUNNER_DIR = ".local_runner"
# Models after the initial one and their pointers: global_r001..., server_r001...
_LATER_MODEL = re.compile(r"(global|server)_r0*[1-9]\d*\.(safetensors|json)")


def _remove_files(top: Path) -> None:
    """Every file below `top`; the directories stay (they are the jobs' planned initialdirs)."""
    if top.is_dir():
        for path in sorted(top.rglob("*")):
            if path.is_file() or path.is_symlink():
                path.unlink()


def reset_run(run_dir: Path, config: RunConfig) -> None:
    """Delete what the run produced and restore the ledger it started from."""
    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for rescue in rescue_files(run_dir / DAG_FILE):
        rescue.unlink()
    shutil.rmtree(run_dir / RUNNER_DIR, ignore_errors=True)
    for model in (run_dir / "models").glob("*.*"):
        if _LATER_MODEL.fullmatch(model.name):
            model.unlink()
    for outputs in ("rounds", "lanes", "async", TENSORBOARD_DIR):
        _remove_files(run_dir / outputs)
    run_id = config.run.run_id
    if config.is_async:
        write_ledger(run_dir, Ledger(run_id=run_id))
